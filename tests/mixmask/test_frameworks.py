"""The five frameworks of mixmask/frameworks/ (docs/methods.md §3-4) on tiny CPU models.

Every expected loss is an independent float64 reference written from the papers' formulas, fed with the
framework's own sub-modules' outputs recomputed here on the same tensors (train mode, same batch
composition, so BatchNorm statistics match). Nothing here calls the loss code under test to build an
expected value (the bf16 test compares the loss functions with themselves by design, and also against
the references).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mixmask.batch import Batch, Mixed
from mixmask.config import Config, ModelConfig
from mixmask.frameworks import FRAMEWORKS
from mixmask.frameworks.barlow_twins import BarlowTwinsConfig
from mixmask.frameworks.byol import BYOLConfig
from mixmask.frameworks.moco_v2 import MoCoV2Config
from mixmask.frameworks.simclr import SimCLRConfig, cross_entropy, cross_view_logits
from mixmask.frameworks.simsiam import SimSiamConfig
from mixmask.losses import area_credited, barlow_twins, info_nce, negative_cosine, normalized_mse, nt_xent

ARCH, STEM, SIZE, N = "resnet10", "imagenet", 32, 8
T_MOCO, T_SIMCLR, LAMBD = 0.2, 0.2, 0.0051
NAMES = [n for n, cls in FRAMEWORKS.items() if not cls.masks_tokens]  # CMAE: tests/mixmask/test_cmae.py

TINY = {
    "moco_v2": lambda **kw: MoCoV2Config(**{"dim": 16, "mlp_hidden": 32, "queue": 32, "momentum": 0.9,
                                             "temperature": T_MOCO, **kw}),
    "simclr": lambda **kw: SimCLRConfig(**{"dim": 16, "mlp_hidden": 32, "temperature": T_SIMCLR, **kw}),
    "byol": lambda **kw: BYOLConfig(**{"dim": 16, "mlp_hidden": 32, "momentum": 0.9, **kw}),
    "simsiam": lambda **kw: SimSiamConfig(**{"dim": 16, "mlp_hidden": 32, "pred_hidden": 8, **kw}),
    "barlow_twins": lambda **kw: BarlowTwinsConfig(**{"dim": 16, "mlp_hidden": 32, "lambd": LAMBD, **kw}),
}
# for the loss references MoCo's keys must be computed on the plain batch (no shuffle / split BN)
PLAIN = {"moco_v2": {"shuffle_bn": False}}
MOMENTUM_NET = {"moco_v2": ("encoder_q", "encoder_k"), "byol": ("online", "target")}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(name: str, *, seed: int = 0, init_seed: int = 0, **cfg) -> torch.nn.Module:
    torch.manual_seed(init_seed)  # the weights' initialisation
    cls = FRAMEWORKS[name]
    return cls(TINY[name](**cfg), arch=ARCH, stem=STEM, seed=seed, group=None)


def make_batch(seed: int = 0, lam: torch.Tensor | None = None, mixed: bool = True) -> Batch:
    g = gen(seed)
    x1, x2 = torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randn(N, 3, SIZE, SIZE, generator=g)
    perm = torch.arange(N).roll(1)  # a derangement: every sample has another partner
    grid = (torch.rand(N, 1, 4, 4, generator=g) > 0.5).float()
    m = F.interpolate(grid, size=(SIZE, SIZE), mode="nearest")  # (N, 1, H, W), 1 = keep x1
    if lam is None:
        lam = torch.rand(N, generator=g)  # any per-sample weights: the loss reads batch.lam as given
    mixes = (Mixed(m * x1 + (1 - m) * x1[perm], perm, lam.float()),) if mixed else ()
    return Batch(x1=x1, x2=x2, labels=torch.zeros(N, dtype=torch.long), mixes=mixes)


# ----------------------------------------------------------------------------------------------------
# independent float64 references (docs/methods.md §4)
# ----------------------------------------------------------------------------------------------------


def unit64(z):
    z = z.double()
    return z / z.norm(dim=1, keepdim=True)


def cos64(a, b):  # per row
    return (unit64(a) * unit64(b)).sum(1)


def ref_info_nce(q, k, queue, t):
    """MoCo's l(q, k): a (1+K)-way softmax cross-entropy, positive at index 0.  -> (N,)"""
    q, k, queue = q.double(), k.double(), queue.double()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / t  # (N, 1 + K)
    return torch.log(torch.exp(logits).sum(1)) - logits[:, 0]


def ref_nt_xent(z1, z2, t):
    """NT-Xent over the 2N views, explicit loop over anchors.  -> (N,)"""
    n = z1.shape[0]
    v = unit64(torch.cat([z1, z2]))
    s = v @ v.T / t
    losses = []
    for u in range(2 * n):
        pos = (u + n) % (2 * n)
        den = sum(torch.exp(s[u, a]) for a in range(2 * n) if a != u)
        losses.append(-(s[u, pos] - torch.log(den)))
    losses = torch.stack(losses)
    return 0.5 * (losses[:n] + losses[n:])


def ref_log_softmax_cross_view(zm, z2, t):
    """log softmax_a( cos(z~_j, z2_a) / T ).  -> (N, N)"""
    logits = unit64(zm) @ unit64(z2).T / t
    return logits - torch.log(torch.exp(logits).sum(1, keepdim=True))


def ref_bt(za, zb, lambd, eps=1e-5):
    za, zb = za.double(), zb.double()
    n, d = za.shape

    def std(z):
        mu = z.mean(0)
        return (z - mu) / torch.sqrt(((z - mu) ** 2).mean(0) + eps)

    c = std(za).T @ std(zb) / n
    eye = torch.eye(d, dtype=torch.float64)
    return (((1 - c) * eye) ** 2).sum() + lambd * ((c * (1 - eye)) ** 2).sum()


@torch.no_grad()
def embed(name, model, batch):
    """The framework's sub-module outputs on the batch, each view its own call as in its forward."""
    x1, x2, xm = batch.x1, batch.x2, batch.mixed
    if name == "moco_v2":
        return {"q": F.normalize(model.encoder_q(x1), dim=1), "k": F.normalize(model.encoder_k(x2), dim=1),
                "qm": F.normalize(model.encoder_q(xm), dim=1) if xm is not None else None}
    if name in ("simclr", "barlow_twins"):
        return {"z1": model.encoder(x1), "z2": model.encoder(x2), "zm": model.encoder(xm) if xm is not None else None}
    if name == "byol":
        return {"p1": model.predictor(model.online(x1)), "p2": model.predictor(model.online(x2)),
                "z1": model.target(x1), "z2": model.target(x2),
                "pm": model.predictor(model.online(xm)) if xm is not None else None}
    if name == "simsiam":
        z1, z2 = model.encoder(x1), model.encoder(x2)
        return {"z1": z1, "z2": z2, "p1": model.predictor(z1), "p2": model.predictor(z2),
                "pm": model.predictor(model.encoder(xm)) if xm is not None else None}
    raise AssertionError(name)


def ref_clean(name, e, queue=None):
    if name == "moco_v2":
        return ref_info_nce(e["q"], e["k"], queue, T_MOCO).mean()
    if name == "simclr":
        return ref_nt_xent(e["z1"], e["z2"], T_SIMCLR).mean()
    if name == "byol":
        return ((2 - 2 * cos64(e["p1"], e["z2"])) + (2 - 2 * cos64(e["p2"], e["z1"]))).mean()
    if name == "simsiam":
        return (0.5 * (-cos64(e["p1"], e["z2"]) - cos64(e["p2"], e["z1"]))).mean()
    if name == "barlow_twins":
        return ref_bt(e["z1"], e["z2"], LAMBD)
    raise AssertionError(name)


def ref_pair(name, e, idx, queue=None):
    """Per sample l(z~_j, t_idx[j]) of a pairwise framework.  -> (N,)"""
    if name == "moco_v2":
        return ref_info_nce(e["qm"], e["k"][idx], queue, T_MOCO)
    if name == "simclr":
        return -ref_log_softmax_cross_view(e["zm"], e["z2"], T_SIMCLR)[torch.arange(N), idx]
    if name == "byol":
        return 2 - 2 * cos64(e["pm"], e["z2"][idx])
    if name == "simsiam":
        return -cos64(e["pm"], e["z2"][idx])
    raise AssertionError(name)


def ref_mix(name, e, perm, lam, queue=None):
    """The MixMask term of §3 (pairwise) or §4.5 (Barlow Twins) for per-sample lam.  -> scalar"""
    lam = lam.double()
    if name == "barlow_twins":
        z2 = e["z2"].double()
        return ref_bt(e["zm"], lam[:, None] * z2 + (1 - lam[:, None]) * z2[perm], LAMBD)
    own = ref_pair(name, e, torch.arange(N), queue)
    partner = ref_pair(name, e, perm, queue)
    return (lam * own + (1 - lam) * partner).mean()


def close(got, expect, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.double(), torch.as_tensor(expect, dtype=torch.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------


def test_registry_matches_config():
    literal = typing.get_args(typing.get_type_hints(ModelConfig)["framework"])
    assert set(literal) == set(FRAMEWORKS) and len(literal) == len(FRAMEWORKS)
    hints = typing.get_type_hints(Config)
    fields = [f.name for f in dataclasses.fields(Config)]
    assert {f for f in fields if f in FRAMEWORKS} == set(FRAMEWORKS)
    for name, cls in FRAMEWORKS.items():
        assert hints[name] is cls.Config, name
        assert isinstance(getattr(Config(), name), cls.Config)
        assert cls.Config().problems() == []
    # no other section carries a framework's config
    config_types = {cls.Config for cls in FRAMEWORKS.values()}
    assert {f for f in fields if hints[f] in config_types} == set(FRAMEWORKS)


# ----------------------------------------------------------------------------------------------------
# one training step, gradients, momentum networks, checkpoint round trip
# ----------------------------------------------------------------------------------------------------


def sgd(model):
    return torch.optim.SGD(model.param_groups(1e-4), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_then_safetensors_round_trip(name, tmp_path):
    model = build(name, seed=3, init_seed=0)  # MoCo with its defaults: split BN on one process
    opt = sgd(model)
    batch = make_batch(1)
    out = model(batch)
    assert set(out) >= {"loss", "loss_clean", "loss_mix"} and all(torch.isfinite(v) for v in out.values())
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    model.after_step(1, 10)

    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))  # refuses shared tensors: no module is registered twice
    fresh = build(name, seed=3, init_seed=1234)  # re-initialised weights (the run seed is config)
    sd, fresh_sd = model.state_dict(), fresh.state_dict()
    assert sd.keys() == fresh_sd.keys()
    assert any(not torch.equal(sd[k], fresh_sd[k]) for k in sd if sd[k].is_floating_point())
    missing, unexpected = fresh.load_state_dict(load_file(str(path)), strict=True)
    assert not missing and not unexpected
    for k, v in fresh.state_dict().items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k

    x = make_batch(2).x1
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model.features(x), fresh.features(x))
        assert torch.equal(model.feature_map(x), fresh.feature_map(x))
    model.train(), fresh.train()
    with torch.no_grad():
        a, b = model(make_batch(3)), fresh(make_batch(3))  # identical state: MoCo draws the same shuffle
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_only_the_online_branch(name):
    model = build(name)
    online_ids = None
    if name in MOMENTUM_NET:
        online, momentum = (getattr(model, a) for a in MOMENTUM_NET[name])
        frozen = list(momentum.parameters())
        assert frozen and all(not p.requires_grad for p in frozen)
        online_ids = {id(p) for p in online.parameters()}
        assert not online_ids & {id(p) for p in frozen}
    opt = sgd(model)
    before = {k: v.clone() for k, v in model.named_parameters()}
    model(make_batch(4))["loss"].backward()
    total = 0.0
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for k, p in trainable:
        assert p.grad is not None, f"{k} got no gradient"
        total += float(p.grad.abs().sum())
    assert total > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(b.grad is None for b in model.buffers())
    opt.step()
    for k, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[k]), f"the optimizer step changed the frozen {k}"
    assert any(not torch.equal(p, before[k]) for k, p in trainable)


@pytest.mark.parametrize("name", list(MOMENTUM_NET))
def test_momentum_network_changes_only_through_after_step(name):
    model = build(name)
    online, momentum = (getattr(model, a) for a in MOMENTUM_NET[name])
    for a, b in zip(online.parameters(), momentum.parameters()):  # starts as a copy of the online network
        assert torch.equal(a, b)
    opt = sgd(model)
    model(make_batch(5))["loss"].backward()
    opt.step()
    theta_o = [p.detach().clone() for p in online.parameters()]
    theta_t = [p.detach().clone() for p in momentum.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(theta_o, theta_t))  # the step moved the online net only
    step, total = 3, 10
    if name == "moco_v2":
        m = model.cfg.momentum  # fixed m
    else:
        m = 1.0 - (1.0 - model.cfg.momentum) * (math.cos(math.pi * step / total) + 1.0) / 2.0  # cosine tau
    model.after_step(step, total)
    for a, t, o in zip(momentum.parameters(), theta_t, theta_o):
        assert not a.requires_grad
        torch.testing.assert_close(a.detach(), m * t + (1 - m) * o, rtol=1e-6, atol=1e-7)
    # the online network is not touched by the update
    for a, o in zip(online.parameters(), theta_o):
        assert torch.equal(a.detach(), o)
    if name == "byol":  # the schedule is really used: at tau_base the result would differ
        wrong = [0.9 * t + 0.1 * o for t, o in zip(theta_t, theta_o)]
        assert any(not torch.allclose(a, w, rtol=1e-6, atol=1e-7) for a, w in zip(momentum.parameters(), wrong))
        snap = [p.clone() for p in momentum.parameters()]
        model.after_step(total, total)  # tau = 1 at the end: no change
        assert all(torch.equal(a, b) for a, b in zip(momentum.parameters(), snap))


# ----------------------------------------------------------------------------------------------------
# the MixMask loss: limits and the general per-sample lam against the papers' formulas
# ----------------------------------------------------------------------------------------------------


def mix_limit_reference(name, e, idx, queue):
    if name == "barlow_twins":
        return ref_bt(e["zm"], e["z2"][idx], LAMBD)
    return ref_pair(name, e, idx, queue).mean()


@pytest.mark.parametrize("name", NAMES)
def test_lam_limits_credit_own_and_partner_targets(name):
    model = build(name, **PLAIN.get(name, {}))
    results = {}
    for lam_value in (1.0, 0.0):
        batch = make_batch(6, lam=torch.full((N,), lam_value))
        queue = model.queue.clone() if name == "moco_v2" else None  # BEFORE forward: it enqueues
        out = model(batch)
        e = embed(name, model, batch)
        idx = torch.arange(N) if lam_value == 1.0 else batch.perm
        expect = mix_limit_reference(name, e, idx, queue)
        close(out["loss_mix"], expect)
        results[lam_value] = out["loss_mix"]
    assert not torch.allclose(results[1.0], results[0.0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_loss_equals_the_papers_formula_for_per_sample_lam(name):
    model = build(name, **PLAIN.get(name, {}))
    batch = make_batch(7, lam=torch.rand(N, generator=gen(70)))
    queue = model.queue.clone() if name == "moco_v2" else None
    out = model(batch)
    e = embed(name, model, batch)
    clean = ref_clean(name, e, queue)
    mix = ref_mix(name, e, batch.perm, batch.lam, queue)
    close(out["loss_clean"], clean)
    close(out["loss_mix"], mix)
    close(out["loss"], clean + mix)
    # masking off: no mixed term, the loss is the framework's own
    plain = make_batch(8, mixed=False)
    queue = model.queue.clone() if name == "moco_v2" else None
    out = model(plain)
    assert "loss_mix" not in out
    e = embed(name, model, plain)
    close(out["loss_clean"], ref_clean(name, e, queue))
    close(out["loss"], ref_clean(name, e, queue))


# ----------------------------------------------------------------------------------------------------
# precision: the losses as the frameworks call them, on bf16 embeddings, under autocast
# ----------------------------------------------------------------------------------------------------


def framework_loss_calls(name, emb, perm, lam, queue):
    """The loss-function calls of the framework's forward (clean, mix) on given embeddings."""
    if name == "moco_v2":
        q, k, qm = emb["q"], emb["k"], emb["qm"]
        return (info_nce(q, k, queue, T_MOCO).mean(),
                area_credited(lambda z, key: info_nce(z, key, queue, T_MOCO), qm, k, perm, lam).mean())
    if name == "simclr":
        z1, z2, zm = emb["z1"], emb["z2"], emb["zm"]
        logits = cross_view_logits(zm, z2, T_SIMCLR)
        return (nt_xent(z1, z2, z1, z2, 0, T_SIMCLR).mean(),
                area_credited(cross_entropy, logits, torch.arange(N), perm, lam).mean())
    if name == "byol":
        p1, p2, z1, z2, pm = (emb[k] for k in ("p1", "p2", "z1", "z2", "pm"))
        return ((normalized_mse(p1, z2) + normalized_mse(p2, z1)).mean(),
                area_credited(normalized_mse, pm, z2, perm, lam).mean())
    if name == "simsiam":
        p1, p2, z1, z2, pm = (emb[k] for k in ("p1", "p2", "z1", "z2", "pm"))
        return ((0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))).mean(),
                area_credited(negative_cosine, pm, z2, perm, lam).mean())
    if name == "barlow_twins":
        z1, z2, zm = emb["z1"], emb["z2"], emb["zm"]
        lam_ = lam.float()[:, None]
        target = lam_ * z2.float() + (1.0 - lam_) * z2.float()[perm]
        return barlow_twins(z1, z2, LAMBD), barlow_twins(zm, target, LAMBD)
    raise AssertionError(name)


EMB_KEYS = {"moco_v2": ("q", "k", "qm"), "simclr": ("z1", "z2", "zm"), "byol": ("p1", "p2", "z1", "z2", "pm"),
            "simsiam": ("p1", "p2", "z1", "z2", "pm"), "barlow_twins": ("z1", "z2", "zm")}


@pytest.mark.parametrize("name", NAMES)
def test_losses_on_bf16_embeddings_are_float32_under_autocast(name):
    g = gen(90)
    emb = {k: torch.randn(N, 16, generator=g) for k in EMB_KEYS[name]}
    if name == "moco_v2":
        emb = {k: F.normalize(v, dim=1) for k, v in emb.items()}
        emb["k"] = F.normalize(emb["q"] + 0.3 * emb["k"], dim=1)
    emb = {k: v.to(torch.bfloat16) for k, v in emb.items()}  # what an autocast forward hands the loss
    queue = F.normalize(torch.randn(256, 16, generator=g), dim=1).T.contiguous()  # float32 buffer
    perm, lam = torch.arange(N).roll(1), torch.rand(N, generator=g)
    plain = framework_loss_calls(name, emb, perm, lam, queue)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = framework_loss_calls(name, emb, perm, lam, queue)
    for a, p in zip(auto, plain):
        assert a.dtype == torch.float32 and p.dtype == torch.float32
        torch.testing.assert_close(a, p, rtol=1e-6, atol=1e-7)
    # and both are the papers' formulas on the (bf16-valued) embeddings, computed in float64
    close(auto[0], ref_clean(name, emb, queue), rtol=1e-5, atol=1e-6)
    close(auto[1], ref_mix(name, emb, perm, lam, queue), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# MoCo specifics: split BN on one process, the queue
# ----------------------------------------------------------------------------------------------------


def test_moco_split_bn_keys_and_queries():
    seed = 7
    model = build("moco_v2", seed=seed, shuffle_bn=True, bn_splits=2)
    reference = copy.deepcopy(model)  # same weights, for the reference computation
    batch = make_batch(9, mixed=False)
    count = int(model.shuffles)
    queue = model.queue.clone()
    out = model(batch)
    assert int(model.shuffles) == count + 1
    keys = model.queue[:, :N].T  # enqueued at pointer 0: this step's keys
    assert int(model.queue_ptr) == N

    # the shuffle the model draws: a function of (seed, count) only
    shuffle = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1_000_003 + count))
    with torch.no_grad():
        enc_k, enc_q = reference.encoder_k, reference.encoder_q
        xs = batch.x2[shuffle]
        k_shuf = torch.cat([F.normalize(enc_k(xs[: N // 2]), dim=1), F.normalize(enc_k(xs[N // 2 :]), dim=1)])
        k_ref = torch.empty_like(k_shuf)
        k_ref[shuffle] = k_shuf  # un-shuffle: row i of k_shuf belongs to sample shuffle[i]
        q_ref = torch.cat([F.normalize(enc_q(batch.x1[: N // 2]), dim=1),
                           F.normalize(enc_q(batch.x1[N // 2 :]), dim=1)])
    torch.testing.assert_close(keys, k_ref, rtol=1e-5, atol=1e-6)
    close(out["loss"], ref_info_nce(q_ref, k_ref, queue, T_MOCO).mean())

    # the protection is real: one BN batch over all keys gives other keys
    whole = build("moco_v2", seed=seed, shuffle_bn=True, bn_splits=1)
    whole.load_state_dict(reference.state_dict())
    whole(batch)
    keys_whole = whole.queue[:, :N].T
    with torch.no_grad():
        torch.testing.assert_close(keys_whole, F.normalize(reference.encoder_k(batch.x2), dim=1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(keys_whole, keys, rtol=1e-3, atol=1e-4)


def test_moco_enqueues_clean_keys_fifo_and_scores_the_old_queue():
    model = build("moco_v2", shuffle_bn=False, queue=12)
    q0 = model.queue.clone()
    b1, b2 = make_batch(10), make_batch(11)
    model(b1)
    k1 = embed("moco_v2", model, b1)["k"]
    torch.testing.assert_close(model.queue[:, :N], k1.T, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.queue[:, N:], q0[:, N:])
    assert int(model.queue_ptr) == N
    q1 = model.queue.clone()
    out = model(b2)
    e2 = embed("moco_v2", model, b2)
    close(out["loss_clean"], ref_info_nce(e2["q"], e2["k"], q1, T_MOCO).mean())  # scored against the old queue
    torch.testing.assert_close(model.queue[:, N:], e2["k"][: 12 - N].T, rtol=1e-5, atol=1e-6)  # wraps around
    torch.testing.assert_close(model.queue[:, : 12 - N], e2["k"][12 - N :].T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.queue[:, 12 - N : N], k1[12 - N :].T)  # the rest of step 1's keys
    assert int(model.queue_ptr) == (2 * N) % 12


# ----------------------------------------------------------------------------------------------------
# optimizer groups
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_param_groups_cover_every_trainable_parameter_once(name, exclude):
    model = build(name)
    groups = model.param_groups(1e-4, exclude_bias_bn=exclude)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    for g in groups:
        assert g["params"] and {"weight_decay", "lr_scale", "fixed_lr", "name"} <= g.keys()
        if "biases_norms" in g["name"]:
            assert exclude and g["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in g["params"])
        else:
            assert g["weight_decay"] == 1e-4
            if exclude:
                assert all(p.ndim > 1 for p in g["params"])


@pytest.mark.parametrize("fix", [True, False])
@pytest.mark.parametrize("exclude", [False, True])
def test_simsiam_predictor_groups_fixed_lr(fix, exclude):
    model = build("simsiam", fix_pred_lr=fix)
    groups = model.param_groups(1e-4, exclude_bias_bn=exclude)
    pred = {id(p) for p in model.predictor.parameters()}
    seen = set()
    for g in groups:
        mine = {id(p) for p in g["params"]}
        assert mine <= pred or not (mine & pred), "a group mixes predictor and encoder parameters"
        is_pred = bool(mine & pred)
        assert g["fixed_lr"] is (fix and is_pred), g["name"]
        assert g["lr_scale"] == 1.0
        if is_pred:
            seen |= mine
    assert seen == pred


@pytest.mark.parametrize("exclude", [False, True])
def test_barlow_twins_bias_norm_group(exclude):
    model = build("barlow_twins", bias_lr_scale=0.024)
    groups = {g["name"]: g for g in model.param_groups(1.5e-6, exclude_bias_bn=exclude)}
    if exclude:
        bn = groups["biases_norms"]
        assert bn["weight_decay"] == 0.0 and bn["lr_scale"] == 0.024
        assert {id(p) for p in bn["params"]} == {id(p) for p in model.parameters() if p.ndim <= 1}
        assert groups["weights"]["lr_scale"] == 1.0 and groups["weights"]["weight_decay"] == 1.5e-6
    else:
        assert set(groups) == {"weights"} and groups["weights"]["lr_scale"] == 1.0
    assert all(not g["fixed_lr"] for g in groups.values())


@pytest.mark.parametrize("name", NAMES)
def test_several_mixed_views_add_up(name):
    """Un-Mix + MixMask hands two mixed views: the framework's mixed loss is the sum of each view's
    (an erased view without a partner, perm None, is credited wholly to its own target)."""
    base = make_batch(3)
    g = gen(5)
    other = Mixed(torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randperm(N, generator=g), torch.rand(N, generator=g))
    erased = Mixed(torch.randn(N, 3, SIZE, SIZE, generator=g), None, torch.ones(N))
    model = build(name, **PLAIN.get(name, {}))

    def loss_mix(mixes):
        m = copy.deepcopy(model)  # the same state for every call (MoCo's queue moves at each forward)
        torch.manual_seed(0)
        return m(Batch(base.x1, base.x2, base.labels, mixes=mixes))["loss_mix"]

    first, second, third = base.mixes[0], other, erased
    both = loss_mix((first, second, third))
    assert torch.allclose(both, loss_mix((first,)) + loss_mix((second,)) + loss_mix((third,)), rtol=1e-5, atol=1e-6)
    assert "loss_mix" not in copy.deepcopy(model)(Batch(base.x1, base.x2, base.labels))
