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

CMAE (contrastive="infonce") gathers its keys WITHOUT gradient (they come from the frozen momentum encoder) and
scores each local query against all W N keys, its positive at row rank * N + j. Each rank's loss is the mean
over its own samples, so the mean of the ranks' losses (and of their loss_con) must equal the one-process loss
on the concatenated batch, and the DDP-averaged gradients its gradients. Negative controls: keys not gathered
(each rank scores against its own N keys, repeated W times), and keys gathered but the positive's row not offset by the
rank; both must change the contrastive loss.

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
from mixmask.frameworks import CMAE, BarlowTwins, MoCoV2, SimCLR
from mixmask.models import BackboneSpec

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


VIT = BackboneSpec("vit_tiny", image_size=SIZE, patch_size=4, vit_depth=1)
VIT_L, VIT_K = (SIZE // 4) ** 2, 4
CMAE_CFG = CMAE.Config(decoder_dim=32, decoder_heads=2, decoder_depth=1, dim=16, mlp_hidden=32, temperature=0.2,
                       contrastive="infonce", w_reconstruction=1.0, w_contrastive=1.0, w_position=0.1)


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
    arch = VIT if cls is CMAE else "resnet10"
    model = cls(cfg, arch=arch, stem="small", seed=SEED, group=group)
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
    # CMAE's kept tokens of x1 (16 patches of 4 px, 4 kept), drawn last: the other fields do not change
    keep = torch.stack([torch.randperm(VIT_L, generator=g)[:VIT_K].sort().values for _ in range(m)])
    return Batch(x1, x2, torch.arange(m), mixes=(Mixed(mixed, perm, lam),), keep=keep)


def local_batch(b: Batch) -> Batch:
    s = slice(RANK * N, (RANK + 1) * N)
    return Batch(b.x1[s], b.x2[s], b.labels[s], mixes=(Mixed(b.mixed[s], b.perm[s] - RANK * N, b.lam[s]),),
                 keep=b.keep[s])


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

# CMAE, infonce: keys gathered without gradient; heads without BN (strip_bn) so the split does not matter
def cmae_step(batch: Batch) -> tuple[list[list[float]], dict[str, torch.Tensor], float]:
    model = DDP(build(CMAE, CMAE_CFG, GROUP))
    res = model(local_batch(batch))
    res["loss"].backward()
    grads = flat_grads(model.module)
    every = all_gather_cat(torch.cat([g.flatten() for g in grads.values()]))
    spread = float((every - every[0]).abs().max())
    losses = all_gather_cat(torch.stack([res["loss"].detach(), res["loss_con"].detach()])).tolist()  # (W, 2)
    return losses, grads, spread


def local_keys_only(t: torch.Tensor, group) -> torch.Tensor:
    """Negative control: no gather, the local keys repeated W times (the shape the framework expects)."""
    return torch.cat([t] * D.world_size(group))


keys_gather, correct_rank = D.gather, D.rank
c_losses, c_grads, c_spread = cmae_step(batch)
D.gather = local_keys_only  # the framework calls D.gather / D.rank at forward time
try:
    nogather_losses = cmae_step(batch)[0]
finally:
    D.gather = keys_gather
D.rank = lambda group: 0  # negative control: gathered keys, positives not offset by the rank
try:
    nooffset_losses = cmae_step(batch)[0]
finally:
    D.rank = correct_rank
if RANK == 0:
    ref_model = build(CMAE, CMAE_CFG, None)
    ref_out = ref_model(batch)
    ref_out["loss"].backward()
    ref = flat_grads(ref_model)
    result["cmae"] = {
        "rank_losses": [r[0] for r in c_losses],
        "rank_loss_con": [r[1] for r in c_losses],
        "reference_loss": float(ref_out["loss"].detach()),
        "reference_loss_con": float(ref_out["loss_con"].detach()),
        "rank_grad_spread": c_spread,
        "max_abs_grad": max(float(g.abs().max()) for g in ref.values()),
        "target_params_trainable": sum(p.requires_grad for p in ref_model.target.parameters()),
        "grads": compare(c_grads, ref),
        "no_gather_loss_con": [r[1] for r in nogather_losses],
        "no_offset_loss_con": [r[1] for r in nooffset_losses],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
dist.barrier()
dist.destroy_process_group()
