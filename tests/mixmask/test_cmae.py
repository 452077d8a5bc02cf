"""CMAE (mixmask/frameworks/cmae.py; its docstring is the specification) and its ViT pieces
(mixmask/models/vit.py, mixmask/losses/mae.py) on a tiny CPU ViT.

As in test_frameworks.py every expected loss is an independent float64 reference written from the
formulas of the docstrings, fed with the framework's own sub-modules' outputs recomputed here on the same
tensors (train mode, same batch, so the heads' BatchNorm statistics match). No expected value is built by
calling the code under test on the quantity being tested.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mixmask.batch import Batch
from mixmask.config import ConfigError, load_config
from mixmask.frameworks import FRAMEWORKS
from mixmask.frameworks.cmae import CMAE, CMAEConfig
from mixmask.losses import info_nce_batch, masked_mse, position_ce
from mixmask.models import BackboneSpec
from mixmask.models.vit import gather_tokens, patchify, unpatchify

SIZE, P, N = 16, 4, 8
G = SIZE // P
L = G * G  # 16 patches
SPEC = BackboneSpec("vit_tiny", image_size=SIZE, patch_size=P, vit_depth=1)
T = 0.2
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(**kw) -> CMAEConfig:
    return CMAEConfig(**{"decoder_dim": 32, "decoder_heads": 2, "decoder_depth": 1, "dim": 16, "mlp_hidden": 32,
                         "momentum": 0.9, "temperature": T, **kw})


def build(init_seed: int = 0, **cfg) -> CMAE:
    torch.manual_seed(init_seed)
    return CMAE(tiny(**cfg), arch=SPEC, seed=0, group=None)


def random_keep(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(n, k) ascending distinct patch indices, drawn here (not by the code under test)."""
    return torch.stack([torch.randperm(L, generator=g)[:k].sort().values for _ in range(n)])


def make_batch(seed: int = 0, k: int = 4, n: int = N) -> Batch:
    g = gen(seed)
    x1, x2 = torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randn(n, 3, SIZE, SIZE, generator=g)
    return Batch(x1, x2, torch.zeros(n, dtype=torch.long), keep=random_keep(n, k, g))


def close(got, expect, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.double(), torch.as_tensor(expect, dtype=torch.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------------


def patches_by_hand(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C): patch l = row-major (i, j), each flattened as (p, p, C)."""
    n, c, h, w = x.shape
    out = []
    for i in range(h // p):
        for j in range(w // p):
            out.append(x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(n, -1))
    return torch.stack(out, dim=1)


def patch_slices(l: int, p: int = P, grid: int = G):
    i, j = divmod(l, grid)
    return slice(i * p, (i + 1) * p), slice(j * p, (j + 1) * p)


def dropped_of(keep: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, L) bool, True where the patch was dropped."""
    m = torch.ones(keep.shape[0], L, dtype=torch.bool)
    for j in range(keep.shape[0]):
        for l in keep[j].tolist():
            m[j, l] = False
    return m


def ref_masked_mse(pred, x, p, dropped, norm_pix=True):
    """MAE's loss, float64: per-patch normalised pixels (unbiased var + 1e-6), mean over pixels, mean over the
    dropped patches of each sample.  -> (N,)"""
    t = patches_by_hand(x.double(), p)
    if norm_pix:
        d = t.shape[-1]
        mu = t.sum(-1, keepdim=True) / d
        var = ((t - mu) ** 2).sum(-1, keepdim=True) / (d - 1)
        t = (t - mu) / torch.sqrt(var + 1e-6)
    err = ((pred.double() - t) ** 2).mean(-1)  # (N, L)
    out = []
    for j in range(err.shape[0]):
        idx = [l for l in range(err.shape[1]) if dropped[j, l]]
        out.append(sum(err[j, l] for l in idx) / len(idx))
    return torch.stack(out)


def ref_ce(logits, index):
    """Cross-entropy of each token's logits over the L patch indices, mean over the tokens.  -> (N,)"""
    z = logits.double()
    lse = torch.log(torch.exp(z - z.max(-1, keepdim=True).values).sum(-1)) + z.max(-1).values  # (N, K)
    picked = torch.stack([torch.stack([z[j, k, index[j, k]] for k in range(z.shape[1])]) for j in range(z.shape[0])])
    return (lse - picked).mean(1)


def unit64(z):
    z = z.double()
    return z / z.norm(dim=1, keepdim=True)


def ref_info_nce(q, z, t):
    """-log softmax_j(q_j . z_a / T) at a = j, q and z normalised here.  -> (N,)"""
    s = unit64(q) @ unit64(z).T / t
    return torch.log(torch.exp(s).sum(1)) - s.diagonal()


def ref_byol(q, z):
    return 2 - 2 * (unit64(q) * unit64(z)).sum(1)


@torch.no_grad()
def parts(model: CMAE, batch: Batch) -> dict[str, torch.Tensor]:
    """The framework's sub-module outputs on the batch, recomputed from its own modules."""
    enc, keep = model.encoder, batch.keep
    h = enc.tokens(batch.x1, keep)
    out = {"h": h, "pred": model.decoder(h, keep)}
    if model.target is not None:
        out["q"] = model.predictor(model.online_head(h[:, 1:].mean(1)))
        tgt = model.target
        out["z"] = tgt.head(tgt.backbone.tokens(batch.x2)[:, 1:].mean(1))  # ALL tokens of x2, momentum branch
    if model.position_head is not None:
        out["logits"] = model.position_head(enc.tokens(batch.x1, keep, pos=False)[:, 1:])
    return out


# ----------------------------------------------------------------------------------------------------
# patchify
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,h,w", [(1, 4, 6), (2, 8, 8), (3, 12, 9), (4, 16, 16), (4, 8, 16), (6, 12, 12), (12, 12, 12)])
def test_patchify_layout_and_round_trip(p, h, w):
    x = torch.randn(2, 3, h, w, generator=gen(p))
    t = patchify(x, p)
    assert t.shape == (2, (h // p) * (w // p), p * p * 3)
    assert torch.equal(t, patches_by_hand(x, p))
    assert torch.equal(unpatchify(t, p, h, w), x)
    # and unpatchify of any token tensor inverts patchify
    r = torch.randn(2, (h // p) * (w // p), p * p * 3, generator=gen(100 + p))
    assert torch.equal(patchify(unpatchify(r, p, h, w), p), r)


def test_gather_tokens():
    t = torch.randn(3, L, 5, generator=gen(1))
    keep = random_keep(3, 6, gen(2))
    got = gather_tokens(t, keep)
    for j in range(3):
        for k in range(6):
            assert torch.equal(got[j, k], t[j, keep[j, k]])


# ----------------------------------------------------------------------------------------------------
# the encoder sees only the kept tokens
# ----------------------------------------------------------------------------------------------------


def test_encoder_reads_only_kept_patches():
    model = build()
    b = make_batch(1)
    enc = model.encoder
    with torch.no_grad():
        base = enc.tokens(b.x1, b.keep)
        assert base.shape == (N, 1 + 4, enc.width)
        # new pixels in every dropped patch: the output is bit-identical
        x = b.x1.clone()
        noise = torch.randn(x.shape, generator=gen(5)) * 10
        dropped = dropped_of(b.keep)
        for j in range(N):
            for l in range(L):
                if dropped[j, l]:
                    hs, ws = patch_slices(l)
                    x[j, :, hs, ws] = noise[j, :, hs, ws]
        assert not torch.equal(x, b.x1)
        assert torch.equal(enc.tokens(x, b.keep), base)
        # one kept patch of sample 0 changed: sample 0 changes, the others do not
        y = b.x1.clone()
        hs, ws = patch_slices(int(b.keep[0, 2]))
        y[0, :, hs, ws] += 1.0
        other = enc.tokens(y, b.keep)
        assert not torch.allclose(other[0], base[0], rtol=1e-3, atol=1e-4)
        assert torch.equal(other[1:], base[1:])
        # all patches kept is the full sequence: timm's forward_features
        full = enc.tokens(b.x1)
        torch.testing.assert_close(full, enc.vit.forward_features(b.x1), rtol=1e-6, atol=1e-6)
        every = torch.arange(L).expand(N, L)
        torch.testing.assert_close(enc.tokens(b.x1, every), full, rtol=1e-6, atol=1e-6)
        # pooled features: the mean of the normalised patch tokens over ALL patches
        torch.testing.assert_close(model.features(b.x1), full[:, 1:].mean(1), rtol=1e-6, atol=1e-6)


def test_kept_tokens_carry_their_own_positional_embedding():
    """With pos=True token k of the kept sequence is patch keep[k] + pos_embed[1 + keep[k]]: feeding the full
    sequence of the kept patches (dropped ones replaced) through the blocks with only the kept tokens must
    give the same result as the kept path, and another positional embedding gives another output."""
    model = build()
    b = make_batch(2)
    enc, v = model.encoder, model.encoder.vit
    with torch.no_grad():
        got = enc.tokens(b.x1, b.keep)
        t = v.patch_embed(b.x1) + v.pos_embed[:, 1:]  # (N, L, D)
        kept = torch.stack([t[j, b.keep[j]] for j in range(N)])
        seq = torch.cat([(v.cls_token + v.pos_embed[:, :1]).expand(N, -1, -1), kept], dim=1)
        expect = v.norm(v.blocks(seq))
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
        v.pos_embed.add_(torch.randn(v.pos_embed.shape, generator=gen(3)))
        assert not torch.allclose(enc.tokens(b.x1, b.keep), got, rtol=1e-3, atol=1e-3)


def test_pos_false_ignores_positional_embeddings_and_is_permutation_equivariant():
    model = build()
    b = make_batch(3, k=6)
    enc = model.encoder
    with torch.no_grad():
        base = enc.tokens(b.x1, b.keep, pos=False)
        with_pos = enc.tokens(b.x1, b.keep)
        enc.vit.pos_embed.copy_(torch.randn(enc.vit.pos_embed.shape, generator=gen(4)))  # all of it, cls's too
        assert torch.equal(enc.tokens(b.x1, b.keep, pos=False), base)
        assert not torch.allclose(enc.tokens(b.x1, b.keep), with_pos, rtol=1e-3, atol=1e-3)  # control
        # swap the pixels of two kept patches of every sample: with pos=False the outputs swap with them
        x = b.x1.clone()
        for j in range(N):
            a, c = int(b.keep[j, 1]), int(b.keep[j, 4])
            (ha, wa), (hc, wc) = patch_slices(a), patch_slices(c)
            x[j, :, ha, wa], x[j, :, hc, wc] = b.x1[j, :, hc, wc], b.x1[j, :, ha, wa]
        swapped = enc.tokens(x, b.keep, pos=False)
        perm = torch.tensor([0, 1, 5, 3, 4, 2, 6])  # tokens 1 + 1 and 1 + 4 trade places
        torch.testing.assert_close(swapped, base[:, perm], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(enc.tokens(x, b.keep), enc.tokens(b.x1, b.keep)[:, perm], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth", [0, 1])
def test_decoder_places_tokens_at_their_patches(depth):
    """Dec(h, keep): the embedded token k at patch keep[k], the mask token (+ the mean of the embedded visible
    tokens for depth 0) at the dropped patches, + the fixed 2-D sin-cos embedding, [cls; .] -> blocks -> norm
    -> pixels; written here with explicit loops from the decoder's own layers."""
    model = build(decoder_depth=depth)
    dec = model.decoder
    b = make_batch(21)
    dropped = dropped_of(b.keep)
    with torch.no_grad():
        h = model.encoder.tokens(b.x1, b.keep)
        got = dec(h, b.keep)
        y = dec.embed(h)  # (N, 1 + K, dim)
        seq = torch.empty(N, 1 + L, y.shape[-1])
        for j in range(N):
            seq[j, 0] = y[j, 0]
            for l in range(L):
                if dropped[j, l]:
                    seq[j, 1 + l] = dec.mask_token[0, 0] + (y[j, 1:].mean(0) if depth == 0 else 0)
                else:
                    k = b.keep[j].tolist().index(l)
                    seq[j, 1 + l] = y[j, 1 + k]
        seq[:, 1:] += dec.pos[0]
        for blk in dec.blocks:
            seq = blk(seq)
        expect = dec.pred(dec.norm(seq[:, 1:]))
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        # the fixed positional embedding is a 2-D sin-cos table: not learned, not in the state dict, distinct rows
        assert not any(k.startswith("decoder.pos") for k in model.state_dict())
        assert not any(p is dec.pos for p in dec.parameters())
        assert torch.unique(dec.pos[0], dim=0).shape[0] == L


# ----------------------------------------------------------------------------------------------------
# the three losses against float64 references
# ----------------------------------------------------------------------------------------------------


def test_masked_mse_formula_on_random_inputs():
    g = gen(6)
    n, p = 5, 2
    x = torch.randn(n, 3, 8, 8, generator=g)
    target = patches_by_hand(x, p)
    pred = torch.randn(target.shape, generator=g)
    dropped = torch.rand(n, 16, generator=g) < 0.6
    dropped[:, 0] = True  # at least one per sample; counts differ per sample
    for norm_pix in (True, False):
        got = masked_mse(pred, target, dropped, norm_pix)
        assert got.shape == (n,) and got.dtype == torch.float32
        close(got, ref_masked_mse(pred, x, p, dropped, norm_pix))
    # the kept patches' predictions do not enter; a dropped patch's does
    other = pred.clone()
    other[~dropped] = torch.randn(int((~dropped).sum()), target.shape[-1], generator=g) * 100
    assert torch.equal(masked_mse(other, target, dropped), masked_mse(pred, target, dropped))
    other = pred.clone()
    other[0, 0] += 1.0
    changed = masked_mse(other, target, dropped)
    assert not torch.allclose(changed[0], masked_mse(pred, target, dropped)[0])
    assert torch.equal(changed[1:], masked_mse(pred, target, dropped)[1:])


def test_position_ce_formula_on_random_inputs():
    g = gen(7)
    logits = torch.randn(4, 5, L, generator=g) * 3
    index = random_keep(4, 5, g)
    got = position_ce(logits, index)
    assert got.shape == (4,) and got.dtype == torch.float32
    close(got, ref_ce(logits, index))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_loss_equals_reference(norm_pix):
    model = build(norm_pix=norm_pix)
    b = make_batch(8)
    out = model(b)
    e = parts(model, b)
    assert e["pred"].shape == (N, L, P * P * 3)
    ref = ref_masked_mse(e["pred"], b.x1, P, dropped_of(b.keep), norm_pix)
    close(out["loss_rec"], ref.mean())
    # the loss reads the dropped patches only: predictions at the kept patches do not enter
    target = patchify(b.x1, P)
    dropped = dropped_of(b.keep)
    pred = e["pred"].clone()
    pred[~dropped] = 1e3
    assert torch.equal(masked_mse(pred, target, dropped, norm_pix), masked_mse(e["pred"], target, dropped, norm_pix))


def test_position_head_loss_and_chance_accuracy():
    model = build(mask_ratio=0.5)
    b = make_batch(9, k=8, n=N)  # 64 tokens over 16 positions
    out = model(b)
    e = parts(model, b)
    assert e["logits"].shape == (N, 8, L)
    close(out["loss_pos"], ref_ce(e["logits"], b.keep).mean())
    acc = (e["logits"].argmax(-1) == b.keep).double().mean()
    close(out["pos_acc"], acc, rtol=0, atol=1e-7)
    # untrained, the tokens carry no position: chance is 1/16 (4 of 64); 16 of 64 is > 6 sd above it
    assert float(out["pos_acc"]) <= 0.25
    # a larger batch for the chance check proper
    big = make_batch(10, k=8, n=64)  # 512 tokens: mean 32, sd 5.5
    with torch.no_grad():
        acc = float(model(big)["pos_acc"])
    assert acc < 1 / L + 0.06, acc


@pytest.mark.parametrize("form", ["infonce", "byol"])
def test_contrastive_loss_equals_reference(form):
    model = build(contrastive=form)
    b = make_batch(11)
    out = model(b)
    e = parts(model, b)
    if form == "infonce":
        ref = ref_info_nce(e["q"], e["z"], T)
    else:
        ref = ref_byol(e["q"], e["z"])
    close(out["loss_con"], ref.mean())
    # the keys are the momentum network's on x2: move it away from the online encoder, and the loss follows it
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(torch.randn(p.shape, generator=gen(12)) * 0.05)
    moved = model(b)
    e2 = parts(model, b)
    assert not torch.allclose(e2["z"], e["z"], rtol=1e-3, atol=1e-3)
    ref2 = ref_info_nce(e2["q"], e2["z"], T) if form == "infonce" else ref_byol(e2["q"], e2["z"])
    close(moved["loss_con"], ref2.mean())
    # the positive of q_j is z_j: pairing it with another sample's key gives another loss
    wrong = ref_info_nce(e2["q"], e2["z"].roll(1, 0), T) if form == "infonce" else ref_byol(e2["q"], e2["z"].roll(1, 0))
    assert not torch.allclose(moved["loss_con"].double(), wrong.mean(), rtol=1e-4, atol=1e-5)


def test_total_loss_is_the_weighted_sum():
    w = {"w_reconstruction": 0.7, "w_contrastive": 0.3, "w_position": 0.4}
    model = build(**w)
    b = make_batch(13)
    out = model(b)
    e = parts(model, b)
    rec = ref_masked_mse(e["pred"], b.x1, P, dropped_of(b.keep)).mean()
    con = ref_info_nce(e["q"], e["z"], T).mean()
    pos = ref_ce(e["logits"], b.keep).mean()
    close(out["loss_rec"], rec)
    close(out["loss_con"], con)
    close(out["loss_pos"], pos)
    close(out["loss"], 0.7 * rec + 0.3 * con + 0.4 * pos)
    assert set(out) == {"loss", "loss_rec", "loss_con", "loss_pos", "pos_acc"}


def test_zero_weights_remove_their_branches():
    b = make_batch(14)
    model = build(w_contrastive=0.0)
    assert model.target is None and model.online_head is None and model.predictor is None
    assert not any(k.startswith(("target.", "online_head.", "predictor.")) for k in model.state_dict())
    out = model(b)
    assert "loss_con" not in out and "loss_pos" in out
    e = parts(model, b)
    close(out["loss"], ref_masked_mse(e["pred"], b.x1, P, dropped_of(b.keep)).mean()
          + 0.1 * ref_ce(e["logits"], b.keep).mean())
    # the target feature map falls back to the online encoder
    torch.testing.assert_close(model.target_feature_map(b.x1), model.feature_map(b.x1))

    model = build(w_position=0.0)
    assert model.position_head is None
    assert not any(k.startswith("position_head.") for k in model.state_dict())
    out = model(b)
    assert "loss_pos" not in out and "pos_acc" not in out and "loss_con" in out
    e = parts(model, b)
    close(out["loss"], ref_masked_mse(e["pred"], b.x1, P, dropped_of(b.keep)).mean()
          + 0.5 * ref_info_nce(e["q"], e["z"], T).mean())

    model = build(w_contrastive=0.0, w_position=0.0)  # the MAE baseline
    out = model(b)
    assert set(out) == {"loss", "loss_rec"}
    torch.testing.assert_close(out["loss"], out["loss_rec"])


def test_zero_reconstruction_weight_leaves_no_unused_parameters():
    """DDP (train.py's accelerator.prepare) fails on trainable parameters that get no gradient."""
    model = build(w_reconstruction=0.0)
    out = model(make_batch(22))
    assert "loss_rec" not in out and model.decoder is None
    out["loss"].backward()
    unused = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_channels_last_and_autocast_forward():
    model = build()
    b = make_batch(23)
    with torch.no_grad():
        ref = model(b)
        cl = model(Batch(b.x1.contiguous(memory_format=torch.channels_last),
                         b.x2.contiguous(memory_format=torch.channels_last), b.labels, keep=b.keep))
        for k in ref:
            torch.testing.assert_close(cl[k], ref[k], rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(Batch(b.x1.bfloat16(), b.x2.bfloat16(), b.labels, keep=b.keep))
    for k in ("loss", "loss_rec", "loss_con", "loss_pos"):
        assert auto[k].dtype == torch.float32 and torch.isfinite(auto[k]), k
        torch.testing.assert_close(auto[k], ref[k], rtol=0.1, atol=0.1)  # bf16 activations, float32 losses


def test_forward_without_keep_raises():
    model = build()
    b = make_batch(15)
    with pytest.raises(ValueError, match="keep"):
        model(Batch(b.x1, b.x2, b.labels))


def test_vit_only():
    assert CMAE.vit_only and CMAE.masks_tokens and FRAMEWORKS["cmae"] is CMAE
    with pytest.raises(ValueError, match="ViT"):
        CMAE(tiny(), arch="resnet10")


# ----------------------------------------------------------------------------------------------------
# gradients, momentum encoder, one optimizer step, checkpoints, optimizer groups
# ----------------------------------------------------------------------------------------------------


def test_gradient_reaches_only_the_online_branch():
    model = build()
    target = list(model.target.parameters())
    assert target and all(not p.requires_grad for p in target)
    assert not {id(p) for p in target} & {id(p) for p in model.encoder.parameters()}
    model(make_batch(16))["loss"].backward()
    assert all(p.grad is None for p in target)
    for name in ("encoder", "decoder", "online_head", "predictor", "position_head"):
        params = list(getattr(model, name).named_parameters())
        assert params
        for k, p in params:
            assert p.requires_grad and p.grad is not None, f"{name}.{k} got no gradient"
        assert sum(float(p.grad.abs().sum()) for _, p in params) > 0, name
    # the cls token and the positional embedding are trained, and the decoder's mask token
    assert float(model.encoder.vit.pos_embed.grad.abs().sum()) > 0
    assert float(model.encoder.vit.cls_token.grad.abs().sum()) > 0
    assert float(model.decoder.mask_token.grad.abs().sum()) > 0
    assert all(b.grad is None for b in model.buffers())


def test_after_step_moves_the_target_by_the_cosine_ema():
    model = build()
    for a, c in zip(model.encoder.parameters(), model.target.backbone.parameters()):
        assert torch.equal(a, c)  # starts as a copy
    opt = torch.optim.SGD(model.param_groups(0.0), lr=0.5)
    model(make_batch(17))["loss"].backward()
    opt.step()
    online = dict(model.encoder.named_parameters()) | {f"head.{k}": v for k, v in model.online_head.named_parameters()}
    target = {k.removeprefix("backbone."): v for k, v in model.target.named_parameters()}
    assert online.keys() == target.keys()
    o0 = {k: v.detach().double().clone() for k, v in online.items()}
    t0 = {k: v.detach().double().clone() for k, v in target.items()}
    others = {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith("target.")}
    assert any(not torch.equal(o0[k], t0[k]) for k in o0)
    step, total = 3, 10
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * step / total) + 1) / 2
    model.after_step(step, total)
    moved = 0
    for k in target:
        expect = tau * t0[k] + (1 - tau) * o0[k]
        torch.testing.assert_close(target[k].double(), expect, rtol=1e-6, atol=1e-7)
        moved += not torch.equal(target[k].double(), t0[k])
    assert moved > 0
    # the schedule is used: tau_base itself would give another target
    wrong = {k: 0.9 * t0[k] + 0.1 * o0[k] for k in t0}
    assert any(not torch.allclose(target[k].double(), wrong[k], rtol=1e-6, atol=1e-7) for k in t0)
    # online parameters untouched
    for k, v in model.named_parameters():
        if not k.startswith("target."):
            assert torch.equal(v, others[k]), k
    snap = {k: v.clone() for k, v in target.items()}
    model.after_step(total, total)  # tau = 1 at the end
    assert all(torch.equal(target[k], snap[k]) for k in target)


def test_adamw_step_then_safetensors_round_trip(tmp_path):
    model = build(init_seed=0)
    groups = model.param_groups(0.05, exclude_bias_bn=True)
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    out = model(make_batch(18))
    assert all(torch.isfinite(v) for v in out.values())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    model.after_step(1, 10)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("target."))

    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = build(init_seed=1234)
    fresh_sd = fresh.state_dict()
    assert after.keys() == fresh_sd.keys()
    assert any(not torch.equal(after[k], fresh_sd[k]) for k in after if after[k].is_floating_point())
    missing, unexpected = fresh.load_state_dict(load_file(str(path)), strict=True)
    assert not missing and not unexpected
    for k, v in fresh.state_dict().items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), k
    b = make_batch(19)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model.features(b.x1), fresh.features(b.x1))
        assert torch.equal(model.feature_map(b.x1), fresh.feature_map(b.x1))
        assert torch.equal(model.target_feature_map(b.x1), fresh.target_feature_map(b.x1))
    model.train(), fresh.train()
    with torch.no_grad():
        a, c = model(b), fresh(b)
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k


@pytest.mark.parametrize("exclude", [False, True])
def test_param_groups(exclude):
    model = build()
    groups = model.param_groups(0.05, exclude_bias_bn=exclude)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not set(ids) & {id(p) for p in model.target.parameters()}
    names = {id(p): k for k, p in model.named_parameters()}
    tokens = {id(model.encoder.vit.cls_token), id(model.encoder.vit.pos_embed), id(model.decoder.mask_token)}
    for g in groups:
        assert g["params"] and {"weight_decay", "lr_scale", "fixed_lr", "name"} <= g.keys()
        assert g["lr_scale"] == 1.0 and not g["fixed_lr"]
    if not exclude:
        assert [g["weight_decay"] for g in groups] == [0.05]
        return
    zero = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert zero | decay == set(ids)
    expect_zero = tokens | {id(p) for p in model.parameters() if p.requires_grad and p.ndim <= 1}
    assert zero == expect_zero, sorted(names[i] for i in zero ^ expect_zero)
    assert all(model.get_parameter(names[i]).ndim > 1 for i in decay)


# ----------------------------------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------------------------------


def test_losses_are_float32_under_bf16_autocast():
    g = gen(20)
    n, k, d = 6, 5, 48
    pred, target = torch.randn(n, L, d, generator=g), torch.randn(n, L, d, generator=g) * 2 + 1
    dropped = torch.rand(n, L, generator=g) < 0.7
    dropped[:, 0] = True
    logits, index = torch.randn(n, k, L, generator=g) * 4, random_keep(n, k, g)
    q = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    keys = F.normalize(torch.cat([q + 0.3 * torch.randn(n, 16, generator=g), torch.randn(3 * n, 16, generator=g)]), dim=1)
    labels = torch.arange(n)

    def calls(pred, target, logits, q, keys):
        return (masked_mse(pred, target, dropped, True), masked_mse(pred, target, dropped, False),
                position_ce(logits, index), info_nce_batch(q, keys, labels, T))

    for dtype in (torch.float32, torch.bfloat16):
        args = [a.to(dtype) for a in (pred, target, logits, q, keys)]
        plain = calls(*[a.float() for a in args])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = calls(*args)
        for a, p in zip(auto, plain):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, p, rtol=1e-6, atol=1e-6)
        # and the float64 references on the same values
        pr, ta, lo, qq, kk = (a.double() for a in args)
        s = qq @ kk.T / T
        ref_nce = torch.logsumexp(s, 1) - s[torch.arange(n), labels]
        dense = torch.zeros(n, L, dtype=torch.float64)
        t_norm = (ta - ta.mean(-1, keepdim=True)) / torch.sqrt(ta.var(-1, keepdim=True, unbiased=True) + 1e-6)
        err = ((pr - t_norm) ** 2).mean(-1)
        dense[dropped] = err[dropped]
        ref_mse = dense.sum(1) / dropped.sum(1)
        close(auto[0], ref_mse, rtol=1e-5, atol=1e-5)
        close(auto[2], ref_ce(lo, index), rtol=1e-5, atol=1e-5)
        close(auto[3], ref_nce, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------

CMAE_OK = ["model.framework=cmae", "model.arch=vit_tiny", "mask.enabled=false"]


@pytest.mark.parametrize("overrides,key", [
    (["model.framework=cmae", "mask.enabled=false"], "model.arch"),  # the default ResNet
    (["model.arch=vit_tiny", "model.patch_size=5", "mask.enabled=false"], "model.patch_size"),  # 64 px
    (CMAE_OK + ["cmae.mask_ratio=1.0"], "cmae.mask_ratio"),
    (CMAE_OK + ["cmae.mask_ratio=0.0"], "cmae.mask_ratio"),
    (CMAE_OK + ["cmae.decoder_dim=30", "cmae.decoder_heads=8"], "cmae.decoder_dim"),
    (["model.arch=vit_tiny", "model.stem=small"], "model.stem"),
    (["model.patch_size=8"], "model.patch_size"),  # a ResNet
    (["model.vit_depth=2"], "model.vit_depth"),  # a ResNet
    (["model.framework=cmae", "model.arch=vit_tiny"], "mask.enabled"),  # pixel masking on by default
    (["cmae.mask_ratio=0.5"], "cmae.mask_ratio"),  # another framework selected
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config([], overrides)
    assert key in str(e.value), str(e.value)


def test_config_cmae_loads():
    cfg = load_config([], CMAE_OK + ["cmae.mask_ratio=0.6", "model.patch_size=8"])
    assert cfg.model.framework == "cmae" and cfg.framework.mask_ratio == 0.6
    assert load_config([], ["model.arch=vit_small", "data.image_size=48", "model.patch_size=16"]).model.arch == "vit_small"


def test_demo_cmae_config():
    cfg = load_config([REPO_CONFIGS / "demo.yaml", REPO_CONFIGS / "demo_cmae.yaml"])
    assert cfg.model.framework == "cmae" and cfg.model.arch.startswith("vit_")
    assert not cfg.mask.enabled
    assert cfg.data.image_size % cfg.model.patch_size == 0
    assert isinstance(cfg.framework, CMAEConfig) and cfg.framework.problems() == []
