"""The loss functions of mixmask/losses/ against independent references written from the papers' formulas
(docs/methods.md §3-4): explicit loops, explicit softmax cross-entropies and cross-correlations in float64.
No expected value here is computed by the code under test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixmask.frameworks.simclr import cross_view_logits
from mixmask.losses import area_credited, barlow_twins, info_nce, negative_cosine, normalized_mse, nt_xent


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def unit(*shape, seed: int) -> torch.Tensor:
    return F.normalize(randn(*shape, seed=seed), dim=-1)


def cos64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------------------------------
# independent references (float64, per sample / per pair loops)
# ----------------------------------------------------------------------------------------------------


def ref_info_nce(q, k, queue, t) -> torch.Tensor:
    """Per sample: a (1+K)-way softmax cross-entropy with the positive at index 0.  queue: (D, K)"""
    q, k, queue = q.double(), k.double(), queue.double()
    out = []
    for j in range(q.shape[0]):
        logits = torch.cat([(q[j] @ k[j])[None], q[j] @ queue]) / t  # (1 + K,)
        out.append(-(logits[0] - torch.log(torch.exp(logits).sum())))
    return torch.stack(out)


def ref_nt_xent_full(z1, z2, t) -> torch.Tensor:
    """NT-Xent over the 2M views {z1} u {z2}, explicit loops; per sample (l(z1_j) + l(z2_j)) / 2.  -> (M,)"""
    views = torch.cat([z1, z2]).double()
    m = z1.shape[0]

    def s(a, b):
        return cos64(views[a], views[b]) / t

    def l(u, v):
        den = sum(math.exp(s(u, a)) for a in range(2 * m) if a != u)
        return -math.log(math.exp(s(u, v)) / den)

    return torch.tensor([0.5 * (l(j, j + m) + l(j + m, j)) for j in range(m)], dtype=torch.float64)


def ref_barlow_twins(za, zb, lambd, eps=1e-5) -> float:
    za, zb = za.double(), zb.double()
    n, d = za.shape

    def std(z):
        mu = z.sum(0) / n
        var = ((z - mu) ** 2).sum(0) / n  # biased
        return (z - mu) / torch.sqrt(var + eps)

    a, b = std(za), std(zb)
    c = [[float(sum(a[s, i] * b[s, j] for s in range(n)) / n) for j in range(d)] for i in range(d)]
    on = sum((1.0 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off


# ----------------------------------------------------------------------------------------------------
# InfoNCE
# ----------------------------------------------------------------------------------------------------


def test_info_nce_equals_per_sample_cross_entropy():
    n, d, kq, t = 6, 16, 32, 0.2
    q, k, queue = unit(n, d, seed=0), unit(n, d, seed=1), unit(kq, d, seed=2).T.contiguous()
    got = info_nce(q, k, queue, t)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_info_nce(q, k, queue, t), rtol=1e-5, atol=1e-6)
    # the positive sits in the numerator: a key equal to the query lowers the loss
    assert (info_nce(q, q, queue, t) < got).all()


def test_info_nce_gradient_reaches_the_query():
    q = unit(4, 8, seed=3).requires_grad_()
    k, queue = unit(4, 8, seed=4), unit(16, 8, seed=5).T.contiguous()
    info_nce(q, k, queue, 0.5).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# NT-Xent
# ----------------------------------------------------------------------------------------------------


def test_nt_xent_one_process_equals_explicit_loop():
    n, d, t = 5, 8, 0.3
    z1, z2 = randn(n, d, seed=10), randn(n, d, seed=11)  # un-normalised: nt_xent normalises itself
    got = nt_xent(z1, z2, z1, z2, 0, t)
    assert got.shape == (n,)
    torch.testing.assert_close(got.double(), ref_nt_xent_full(z1, z2, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [0, 1])
def test_nt_xent_with_offset_equals_the_full_batch_rows(rank):
    """Two simulated ranks: the bank is the concatenation of both halves, the local rows are one half."""
    n, d, t = 4, 8, 0.2
    z1_all, z2_all = randn(2 * n, d, seed=12), randn(2 * n, d, seed=13)
    full = ref_nt_xent_full(z1_all, z2_all, t)  # (2N,)
    rows = slice(rank * n, (rank + 1) * n)
    got = nt_xent(z1_all[rows], z2_all[rows], z1_all, z2_all, rank * n, t)
    torch.testing.assert_close(got.double(), full[rows], rtol=1e-5, atol=1e-6)
    # a wrong offset gives a different (wrong) result: the offset is really used
    wrong = nt_xent(z1_all[rows], z2_all[rows], z1_all, z2_all, (1 - rank) * n, t)
    assert not torch.allclose(wrong.double(), full[rows], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# cosine losses
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, ref", [(normalized_mse, lambda c: 2.0 - 2.0 * c), (negative_cosine, lambda c: -c)],
                         ids=["normalized_mse", "negative_cosine"])
def test_cosine_losses(fn, ref):
    p = (3.0 * randn(6, 10, seed=20)).requires_grad_()
    z = randn(6, 10, seed=21).requires_grad_()
    got = fn(p, z)
    assert got.shape == (6,)
    expect = torch.tensor([ref(cos64(p[j].detach(), z[j].detach())) for j in range(6)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None or not z.grad.any()  # the target carries no gradient


def test_normalized_mse_is_squared_distance_of_unit_vectors():
    p, z = randn(5, 7, seed=22), randn(5, 7, seed=23)
    direct = ((F.normalize(p.double(), dim=1) - F.normalize(z.double(), dim=1)) ** 2).sum(1)
    torch.testing.assert_close(normalized_mse(p, z).double(), direct, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Barlow Twins
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_barlow_twins_equals_explicit_cross_correlation(lambd):
    n, d = 8, 6
    za = 2.0 * randn(n, d, seed=30) + 1.5
    zb = 0.5 * za + randn(n, d, seed=31)  # correlated, different scale and mean
    got = barlow_twins(za, zb, lambd)
    assert got.ndim == 0
    assert float(got) == pytest.approx(ref_barlow_twins(za, zb, lambd), rel=1e-5, abs=1e-6)


def test_barlow_twins_eps_matters_for_constant_dims():
    """A constant dimension standardises to 0 (eps keeps it finite): C_ii = 0 costs exactly 1."""
    za, zb = randn(8, 3, seed=32), randn(8, 3, seed=33)
    za[:, 0] = 4.0
    got = barlow_twins(za, zb, 0.0)
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(ref_barlow_twins(za, zb, 0.0), rel=1e-5)
    assert float(got) >= 1.0


def test_barlow_twins_perfect_twins_is_zero_on_the_diagonal():
    z = randn(64, 4, seed=34)
    # identical inputs: C_ii = var/(var+eps) ~ 1, the on-diagonal term vanishes up to eps
    assert float(barlow_twins(z, z, 0.0)) < 1e-6


# ----------------------------------------------------------------------------------------------------
# the MixMask credit
# ----------------------------------------------------------------------------------------------------


def sq_dist(z, t):  # an arbitrary per-sample pair loss (N, D), (N, D) -> (N,)
    return ((z - t) ** 2).sum(1)


@pytest.fixture
def credit_data():
    n = 6
    return randn(n, 5, seed=40), randn(n, 5, seed=41), torch.arange(n).roll(1)


def test_area_credited_lam_one_is_own_target(credit_data):
    z, t, perm = credit_data
    got = area_credited(sq_dist, z, t, perm, torch.ones(6))
    torch.testing.assert_close(got, ((z - t) ** 2).sum(1))


def test_area_credited_lam_zero_is_partner_target(credit_data):
    z, t, perm = credit_data
    got = area_credited(sq_dist, z, t, perm, torch.zeros(6))
    expect = torch.stack([((z[j] - t[perm[j]]) ** 2).sum() for j in range(6)])
    torch.testing.assert_close(got, expect)
    assert not torch.allclose(got, ((z - t) ** 2).sum(1))


def test_area_credited_general_lam_is_per_sample_convex_combination(credit_data):
    z, t, perm = credit_data
    lam = torch.tensor([0.0, 0.1, 0.5, 0.7, 0.99, 1.0])
    got = area_credited(sq_dist, z, t, perm, lam)
    expect = torch.stack([lam[j] * ((z[j] - t[j]) ** 2).sum() + (1 - lam[j]) * ((z[j] - t[perm[j]]) ** 2).sum()
                          for j in range(6)])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expect)


def test_area_credited_float64_lam_still_float32(credit_data):
    z, t, perm = credit_data
    got = area_credited(sq_dist, z, t, perm, torch.full((6,), 0.25, dtype=torch.float64))
    assert got.dtype == torch.float32


def test_area_credited_integer_index_targets():
    """SimCLR style: the target is a class index into a logit matrix (soft-label cross-entropy)."""
    n, m = 5, 7
    logits = randn(n, m, seed=42)
    own = torch.arange(n) + 2  # e.g. an offset of 2 into the global batch
    perm = torch.arange(n).roll(2)
    lam = torch.rand(n, generator=gen(43))
    got = area_credited(lambda z, y: F.cross_entropy(z, y, reduction="none"), logits, own, perm, lam)
    lg = logits.double()
    expect = []
    for j in range(n):
        logp = lg[j] - torch.log(torch.exp(lg[j]).sum())
        expect.append(-(lam[j].double() * logp[own[j]] + (1 - lam[j].double()) * logp[own[perm[j]]]))
    torch.testing.assert_close(got.double(), torch.stack(expect), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# float32 under autocast
# ----------------------------------------------------------------------------------------------------

N_AC, D_AC, K_AC = 8, 32, 256


def _ac_inputs(dtype):
    q, k = unit(N_AC, D_AC, seed=50), unit(N_AC, D_AC, seed=51)
    queue = unit(K_AC, D_AC, seed=52).T.contiguous()
    z1, z2 = randn(N_AC, D_AC, seed=53), randn(N_AC, D_AC, seed=54)
    return [x.to(dtype) for x in (q, k, queue, z1, z2)]


LOSS_CALLS = {
    "info_nce": lambda q, k, queue, z1, z2: info_nce(q, k, queue, 0.2),
    "nt_xent": lambda q, k, queue, z1, z2: nt_xent(z1, z2, z1, z2, 0, 0.2),
    "cross_view_logits": lambda q, k, queue, z1, z2: cross_view_logits(z1, z2, 0.2),
    "normalized_mse": lambda q, k, queue, z1, z2: normalized_mse(z1, z2),
    "negative_cosine": lambda q, k, queue, z1, z2: negative_cosine(z1, z2),
    "barlow_twins": lambda q, k, queue, z1, z2: barlow_twins(z1, z2, 0.0051),
}


@pytest.mark.parametrize("name", list(LOSS_CALLS))
def test_loss_runs_in_float32_under_autocast(name):
    call = LOSS_CALLS[name]
    inputs = _ac_inputs(torch.float32)
    plain = call(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = call(*inputs)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-7)


def test_undecorated_info_nce_under_bf16_autocast_is_off():
    """What the float32 decorator fixes: the classic matmul/einsum InfoNCE under bf16 autocast rounds the
    logits, and against a 4096-key queue the per-sample loss moves by more than 1e-3."""
    n, d, kq, t = 16, 128, 4096, 0.2
    q = unit(n, d, seed=60)
    k = F.normalize(q + 0.3 * randn(n, d, seed=61), dim=1)
    queue = unit(kq, d, seed=62).T.contiguous()

    def plain_info_nce(q, k, queue, t):
        l_pos = torch.einsum("nc,nc->n", q, k)[:, None]
        l_neg = torch.einsum("nc,ck->nk", q, queue)
        logits = torch.cat([l_pos, l_neg], dim=1) / t
        return F.cross_entropy(logits.float(), torch.zeros(len(q), dtype=torch.long), reduction="none")

    ref = ref_info_nce(q, k, queue, t)
    fp32 = plain_info_nce(q, k, queue, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bad = plain_info_nce(q, k, queue, t)
        good = info_nce(q, k, queue, t)
    assert (fp32.double() - ref).abs().max() < 1e-5  # the plain version itself is right in float32
    assert (bad.double() - ref).abs().max() > 1e-3  # ... but not under autocast
    assert (good.double() - ref).abs().max() < 1e-5  # the decorated one is
