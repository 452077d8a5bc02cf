"""The MixMask loss against an independent per-sample computation (mixmask/losses.py, SPEC.md 1.6)."""

import pytest
import torch
import torch.nn.functional as F

from mixmask.losses import info_nce, mixmask_loss


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def moco_ce(q, k, queue, t):
    """One sample's InfoNCE as a (1+K)-way cross-entropy with the positive at index 0."""
    logits = torch.cat([(q @ k)[None], q @ queue]) / t  # (1 + K,)
    return F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long))


@pytest.fixture
def data():
    n, d, kq = 6, 16, 32
    return unit(n, d, seed=0), unit(n, d, seed=1), unit(n, d, seed=2), unit(kq, d, seed=3).T.contiguous()


def test_info_nce_matches_cross_entropy(data):
    q, k, _, queue = data
    got = info_nce(q, k, queue, 0.2)
    ref = torch.stack([moco_ce(q[i], k[i], queue, 0.2) for i in range(len(q))])
    assert torch.allclose(got, ref, atol=1e-5)


def test_general_form_matches_per_sample_reference(data):
    q, k, q_mix, queue = data
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    lam = torch.tensor([0.1, 0.5, 0.9, 0.25, 0.0, 1.0])
    t = 0.2
    out = mixmask_loss(q, k, queue, t, q_mix, perm, lam)
    ref = torch.stack(
        [
            moco_ce(q[j], k[j], queue, t)
            + lam[j] * moco_ce(q_mix[j], k[j], queue, t)
            + (1 - lam[j]) * moco_ce(q_mix[j], k[perm[j]], queue, t)
            for j in range(len(q))
        ]
    ).mean()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((out["loss_clean"] + out["loss_mix"]).item(), rel=1e-6)


def test_lam_one_is_moco_on_the_mixed_view(data):
    q, k, q_mix, queue = data
    perm = torch.arange(len(q)).flip(0)
    out = mixmask_loss(q, k, queue, 0.2, q_mix, perm, torch.ones(len(q)))
    ref = info_nce(q, k, queue, 0.2).mean() + info_nce(q_mix, k, queue, 0.2).mean()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_lam_zero_credits_the_partner_only(data):
    q, k, q_mix, queue = data
    perm = torch.arange(len(q)).roll(1)
    out = mixmask_loss(q, k, queue, 0.2, q_mix, perm, torch.zeros(len(q)))
    assert out["loss_mix"].item() == pytest.approx(info_nce(q_mix, k[perm], queue, 0.2).mean().item(), rel=1e-6)


def test_masking_off_is_plain_moco(data):
    q, k, _, queue = data
    out = mixmask_loss(q, k, queue, 0.2)
    assert "loss_mix" not in out
    assert out["loss"].item() == pytest.approx(info_nce(q, k, queue, 0.2).mean().item(), rel=1e-6)


def test_gradient_flows_to_both_queries_only(data):
    q, k, q_mix, queue = data
    q, q_mix, k = q.clone().requires_grad_(), q_mix.clone().requires_grad_(), k.clone().requires_grad_()
    mixmask_loss(q, k.detach(), queue, 0.2, q_mix, torch.arange(6).flip(0), torch.full((6,), 0.5))["loss"].backward()
    assert q.grad.abs().sum() > 0 and q_mix.grad.abs().sum() > 0 and k.grad is None
