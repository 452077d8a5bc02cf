"""Run under `python -m torch.distributed.run --nproc_per_node=2 ... dist_gather_worker.py <outdir>` (gloo, CPU);
used by tests/mixmask/test_distributed_losses.py.

For SimCLR and Barlow Twins (both gather their projections with gradient), each rank takes its half of a
global batch, runs the framework under DistributedDataParallel and backpropagates. Rank 0 then runs the
SAME model (same seed) with group=None on the concatenated global batch in this one process and compares:

    SimCLR:        one-process loss == mean of the ranks' losses (each is the mean over its local samples)
    Barlow Twins:  one-process loss == every rank's loss (the loss is over the gathered global batch)
    both:          the DDP-averaged parameter gradients == the one-process gradients

A negative control then monkeypatches mixmask.distributed.gather_with_grad with the classic broken gather
(all_gather of detached tensors + the local tensor re-inserted: its backward does NOT sum the gradients of
the other ranks' copies) and reruns, so the test shows it would catch that bug. MoCo v2 (local loss, gathers
only for shuffle-BN and the queue, keys different from one process by design) is only run: finite loss and
gradients, the same queue on both ranks.

Batch norm: with BN in train mode each rank normalises with its own 4-sample statistics, which differ from
the 8-sample statistics of one process, so for the exact comparison every BatchNorm of the model (backbone
and projector) is REPLACED BY nn.Identity (strip_bn below); the losses themselves do not depend on the
train/eval mode. MoCo keeps its BN (its check is not an equality).

Rank 0 writes <outdir>/result.json; the test asserts on it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import mixmask.distributed as D
from mixmask.batch import Batch, Mixed
from mixmask.frameworks import BarlowTwins, MoCoV2, SimCLR

N, SIZE, SEED = 4, 16, 0  # per-rank batch, image size, weight seed
RTOL, ATOL = 1e-4, 1e-5

out = Path(sys.argv[1])
dist.init_process_group("gloo")
torch.set_num_threads(1)
WORLD, RANK = dist.get_world_size(), dist.get_rank()
GROUP = dist.group.WORLD

CASES = {
    "simclr": (SimCLR, SimCLR.Config(dim=16, mlp_hidden=32, temperature=0.2)),
    "barlow_twins": (BarlowTwins, BarlowTwins.Config(dim=16, mlp_hidden=32, lambd=0.0051)),
}


def strip_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm -> Identity, in place: the forward no longer depends on how the batch is split."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            strip_bn(child)
    return module


def build(cls, cfg, group, bn: bool = False) -> nn.Module:
    torch.manual_seed(SEED)  # the frameworks draw their initial weights from the global RNG: same on all ranks
    model = cls(cfg, arch="resnet10", stem="small", seed=SEED, group=group)
    return model if bn else strip_bn(model)


def global_batch() -> Batch:
    """The global batch of W N samples; perm stays within each rank's block (MixMask's perm is local)."""
    g = torch.Generator().manual_seed(1234)  # the same on every rank
    m = WORLD * N
    x1, x2 = torch.randn(m, 3, SIZE, SIZE, generator=g), torch.randn(m, 3, SIZE, SIZE, generator=g)
    local_perm = torch.roll(torch.arange(N), 1)  # a derangement of the local block
    perm = torch.cat([local_perm + r * N for r in range(WORLD)])  # global indices
    pixel = (torch.rand(m, 1, SIZE, SIZE, generator=g) < torch.rand(m, 1, 1, 1, generator=g)).float()
    mixed = pixel * x1 + (1 - pixel) * x1[perm]
    lam = pixel.mean(dim=(1, 2, 3))  # realised fraction from x1[j], random per sample
    return Batch(x1, x2, torch.arange(m), mixes=(Mixed(mixed, perm, lam),))


def local_batch(b: Batch) -> Batch:
    s = slice(RANK * N, (RANK + 1) * N)
    return Batch(b.x1[s], b.x2[s], b.labels[s], mixes=(Mixed(b.mixed[s], b.perm[s] - RANK * N, b.lam[s]),))


def flat_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:  # (k,) on every rank -> (W, k)
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def distributed_step(cls, cfg, batch: Batch) -> tuple[list[float], dict[str, torch.Tensor], float]:
    """DDP forward/backward of the local half; -> (loss of each rank, grads, max grad spread across ranks)."""
    model = DDP(build(cls, cfg, GROUP))
    loss = model(local_batch(batch))["loss"]
    loss.backward()
    grads = flat_grads(model.module)
    # DDP averaged the gradients: they must be identical on both ranks (checked, not assumed)
    flat = torch.cat([g.flatten() for g in grads.values()])
    every = all_gather_cat(flat)
    spread = float((every - every[0]).abs().max())
    losses = all_gather_cat(loss.detach().reshape(1)).flatten().tolist()
    return losses, grads, spread


def compare(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    assert grads.keys() == ref.keys()
    diff = max(float((grads[k] - ref[k]).abs().max()) for k in ref)
    close = {k: torch.allclose(grads[k], ref[k], rtol=RTOL, atol=ATOL) for k in ref}
    return {"max_abs_diff": diff, "allclose": all(close.values()), "n_params": len(ref),
            "n_params_not_close": sum(not c for c in close.values()),
            "not_close_examples": [k for k, c in close.items() if not c][:5]}


def broken_gather_with_grad(t: torch.Tensor, group) -> torch.Tensor:
    """The classic bug: the other ranks' slices carry no gradient, so the backward does not sum over ranks."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = t
    return torch.cat(parts)


result: dict = {"world": WORLD, "n_per_rank": N, "rtol": RTOL, "atol": ATOL}
batch = global_batch()
correct_gather = D.gather_with_grad
for name, (cls, cfg) in CASES.items():
    losses, grads, spread = distributed_step(cls, cfg, batch)
    D.gather_with_grad = broken_gather_with_grad  # negative control (the frameworks call D.gather_with_grad)
    try:
        b_losses, b_grads, b_spread = distributed_step(cls, cfg, batch)
    finally:
        D.gather_with_grad = correct_gather
    if RANK == 0:  # the reference: one process, the concatenated batch, the global perm
        ref_model = build(cls, cfg, None)
        ref_loss = ref_model(batch)["loss"]
        ref_loss.backward()
        ref = flat_grads(ref_model)
        result[name] = {
            "rank_losses": losses,
            "reference_loss": float(ref_loss.detach()),
            "rank_grad_spread": spread,
            "max_abs_grad": max(float(g.abs().max()) for g in ref.values()),
            "grads": compare(grads, ref),
            "broken": {"rank_losses": b_losses, "rank_grad_spread": b_spread, "grads": compare(b_grads, ref)},
        }

# MoCo v2: runs under DDP with the gathers (shuffle-BN over both ranks, queue of the gathered keys)
cfg = MoCoV2.Config(dim=16, mlp_hidden=32, queue=32, temperature=0.2)
moco = DDP(build(MoCoV2, cfg, GROUP, bn=True))
moco_loss = moco(local_batch(batch))["loss"]
moco_loss.backward()
moco.module.after_step(0, 1)
g = torch.cat([p.grad.flatten() for p in moco.module.parameters() if p.requires_grad])
queue = moco.module.queue.detach().clone()
queues = all_gather_cat(queue.flatten())
moco_losses = all_gather_cat(moco_loss.detach().reshape(1)).flatten().tolist()
if RANK == 0:
    result["moco_v2"] = {
        "rank_losses": moco_losses,
        "finite_loss": all(math.isfinite(v) for v in moco_losses),
        "finite_grads": bool(torch.isfinite(g).all()),
        "nonzero_grads": bool(g.abs().sum() > 0),
        "queue_ptr": int(moco.module.queue_ptr),
        "queue_same_on_ranks": bool(torch.equal(queues[0], queues[1])),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
dist.barrier()
dist.destroy_process_group()
