"""model.batch_views: the online views of a framework in ONE forward with BatchNorm statistics per view
(mixmask/models/norm.py, frameworks/base.py encode_views) equal the separate forwards: the same losses, the
same gradients and the same BN running statistics (updated view by view in the same order)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mixmask.batch import Batch, Mixed
from mixmask.frameworks import FRAMEWORKS
from mixmask.frameworks.barlow_twins import BarlowTwinsConfig
from mixmask.frameworks.byol import BYOLConfig
from mixmask.frameworks.moco_v2 import MoCoV2Config
from mixmask.frameworks.simclr import SimCLRConfig
from mixmask.frameworks.simsiam import SimSiamConfig
from mixmask.models.norm import BatchNorm1d, BatchNorm2d, bn_groups

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE, N = 16, 8
TINY = {
    "moco_v2": lambda **kw: MoCoV2Config(**{"dim": 16, "mlp_hidden": 32, "queue": 32, "momentum": 0.9, **kw}),
    "simclr": lambda **kw: SimCLRConfig(**{"dim": 16, "mlp_hidden": 32, **kw}),
    "byol": lambda **kw: BYOLConfig(**{"dim": 16, "mlp_hidden": 32, "momentum": 0.9, **kw}),
    "simsiam": lambda **kw: SimSiamConfig(**{"dim": 16, "mlp_hidden": 32, "pred_hidden": 8, **kw}),
    "barlow_twins": lambda **kw: BarlowTwinsConfig(**{"dim": 16, "mlp_hidden": 32, **kw}),
}
CASES = [pytest.param(n, {}, id=n) for n in TINY] + [
    pytest.param("moco_v2", {"bn_splits": 3}, id="moco_v2-splits3"),  # unequal chunks: 3, 3, 2 per view
    pytest.param("moco_v2", {"bn_splits": 1}, id="moco_v2-splits1"),
    pytest.param("moco_v2", {"shuffle_bn": False}, id="moco_v2-noshuffle"),
]


def cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def make_batch(seed: int, mixes: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randn(N, 3, SIZE, SIZE, generator=g)
    out = []
    for _ in range(mixes):
        perm = torch.randperm(N, generator=g)
        m = F.interpolate((torch.rand(N, 1, 4, 4, generator=g) > 0.5).float(), size=(SIZE, SIZE))
        out.append(Mixed(cl(m * x1 + (1 - m) * x1[perm]), perm, torch.rand(N, generator=g)))
    return Batch(cl(x1), cl(x2), torch.zeros(N, dtype=torch.long), mixes=tuple(out))


def build(name: str, **cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FRAMEWORKS[name](TINY[name](**cfg), arch="resnet10", stem="small", seed=1, group=None)
    return model.to(memory_format=torch.channels_last)


def compare(a: torch.nn.Module, b: torch.nn.Module, rtol=1e-4, atol=1e-5) -> None:
    """Gradients within 1e-4 of each tensor's largest entry (float32 convolutions of a batch of 8 and of 24
    round differently: ~1e-6 of the scale after one step), buffers within rtol/atol."""
    for (k, p), (k2, q) in zip(a.named_parameters(), b.named_parameters()):
        assert k == k2
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=1e-4 * float(p.grad.abs().max()) + 1e-7,
                                       msg=lambda m: f"{k}: {m}")
    for k, v in a.state_dict().items():  # running statistics, num_batches_tracked, MoCo's queue
        w = b.state_dict()[k]
        if v.is_floating_point():
            torch.testing.assert_close(v, w, rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(v, w), k


@pytest.mark.parametrize("name,cfg", CASES)
def test_batched_views_equal_separate_forwards(name, cfg):
    separate = build(name, **cfg)
    batched = copy.deepcopy(separate)
    batched.batch_views = True
    batch = make_batch(0, mixes=2)  # x1, x2 and two mixed views: up to 4 BN groups
    out_s, out_b = separate(batch), batched(batch)
    assert out_s.keys() == out_b.keys()
    for k in out_s:
        torch.testing.assert_close(out_b[k], out_s[k], rtol=1e-5, atol=1e-5, msg=k)
    out_s["loss"].backward()
    out_b["loss"].backward()
    compare(separate, batched)
    # a BN layer really saw one group per view: its counter moved once per group
    bn = next(m for m in batched.modules() if isinstance(m, BatchNorm2d))
    assert int(bn.num_batches_tracked) > 2


@pytest.mark.parametrize("momentum", [0.1, None])
def test_grouped_batchnorm_is_separate_calls_bit_for_bit(momentum):
    """The layer alone: BN of 2d (channels_last) and 1d inputs; momentum None = the cumulative average."""
    g = torch.Generator().manual_seed(0)
    for cls, shape in ((BatchNorm2d, (12, 4, 5, 5)), (BatchNorm1d, (12, 6))):
        ref = cls(shape[1], momentum=momentum)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
        bn = copy.deepcopy(ref)
        x = torch.randn(*shape, generator=g)
        if len(shape) == 4:
            x = cl(x)
        x.requires_grad_(True)
        sizes = (5, 4, 3)
        y_ref = torch.cat([ref(c) for c in x.split(sizes)])
        with bn_groups(bn, sizes):
            y = bn(x)
        assert bn.group_sizes is None  # restored
        assert torch.equal(y, y_ref)
        if len(shape) == 4:
            assert y.is_contiguous(memory_format=torch.channels_last)
        for k, v in ref.state_dict().items():
            assert torch.equal(bn.state_dict()[k], v), k
        assert int(bn.num_batches_tracked) == 3
        w = torch.randn(y.shape, generator=g)
        gx_ref, gw_ref = torch.autograd.grad((y_ref * w).sum(), (x, ref.weight))
        gx, gw = torch.autograd.grad((y * w).sum(), (x, bn.weight))
        assert torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)
        # eval mode: running statistics, the grouping changes nothing
        bn.eval(), ref.eval()
        with bn_groups(bn, sizes), torch.no_grad():
            assert torch.equal(bn(x), ref(x))


def test_bn_groups_rejects_bad_sizes_and_restores_on_error():
    bn = BatchNorm1d(3)
    with pytest.raises(ValueError, match="group sizes"):
        with bn_groups(bn, []):
            pass
    with pytest.raises(RuntimeError):  # the sizes must add up to the batch
        with bn_groups(bn, (2, 2)):
            bn(torch.randn(5, 3))
    assert bn.group_sizes is None
    assert isinstance(bn, torch.nn.BatchNorm1d)  # torch's class: state_dict keys and export unchanged
