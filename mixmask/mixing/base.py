"""What every mixing method gets and gives (docs/methods.md §2, §7).

A mixer is called once per batch inside the input pipeline, on the training device:

    views = mixer(v1, v2, keys, px)     v1, v2 (N, H, W, 3) uint8 -> Views

keys (seed, epoch, batch_index = step * world + rank) key every random draw (kernels/rng.py Philox
streams), so runs are reproducible, resume exactly, and do not depend on the device or the route.
px holds the normalisation and the kernels: binary masks go through the fused uint8 select +
normalise kernel (px.mix); float work (mixup, noise, high-pass) runs after normalisation in
normalised float32 units (px.float_views, px.mixup, px.noise_fill_, px.high_pass) and is then cast to
the training dtype (px.finish).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mixmask import masks as mk
from mixmask.batch import Mixed
from mixmask.fused import Route, kernels_for, normalize, normalize_and_mix

Stats = tuple[float, float, float]


@dataclass(frozen=True)
class Keys:
    seed: int
    epoch: int
    batch_index: int  # step * world + rank: unique per (step, process)


@dataclass
class Views:
    x1: torch.Tensor  # (N, 3, H, W) the query view as the method made it
    x2: torch.Tensor  # (N, 3, H, W)
    mixes: tuple[Mixed, ...] = ()
    hard_negative: torch.Tensor | None = None  # (N, 3, H, W)


class Mixer:
    """Base of the mixing methods. ``sections``: the config sections the method reads (a key set in
    another method's section is a config error); ``hard_negatives``: whether it makes hard negatives
    (then the framework must have negatives); ``grids``: the keys of its cell grids, given at
    data.image_size: under progressive resolution (data.size_start) a view of side s gets
    grid_at(g, full_size, s) = s / cell cells a side, cell = data.image_size / g (mixmask/resolution.py)."""

    name: str = ""
    sections: tuple[str, ...] = ()
    hard_negatives: bool = False
    grids: tuple[str, ...] = ()  # config keys of its cell grids (progressive resolution keeps their cells' px size)

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor, keys: Keys, px: Pixels) -> Views:  # pragma: no cover
        raise NotImplementedError


class Pixels:
    """Normalisation and the kernels of one stage, for one device; every route gives the same values.

    route "auto"/"numba": our Numba kernels (CPU njit, or CUDA when numba.cuda sees a GPU);
    "torch": the plain-numpy references of the kernels (on the host) and torch's normalise/select.
    """

    def __init__(self, mean: Stats, std: Stats, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 route: Route = "auto"):
        self.mean, self.std, self.dtype, self.channels_last, self.route = mean, std, dtype, channels_last, route
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    # -- binary masks: the fused uint8 kernel -----------------------------------------------------
    def mix(self, v1, v2, masks, perm, dtype=None):
        """(x1, x2, mixed) normalised; masks (1 or N, gh, gw) uint8 select v1 (1) or v1[perm] (0)."""
        return normalize_and_mix(v1, v2, masks, perm, self.mean, self.std, dtype or self.dtype, self.channels_last,
                                 self.route)

    def normalize(self, v, dtype=None):
        return normalize(v, self.mean, self.std, dtype or self.dtype, self.channels_last, self.route)

    def sample_masks(self, *args) -> torch.Tensor:
        """kernels.sample_masks (or its reference on the torch route) -> (n, g, g) uint8 on the CPU."""
        from kernels import masks as km

        fn = km.sample_masks_reference if self.route == "torch" else km.sample_masks
        return torch.from_numpy(fn(*args))

    def cell_masks(self, *args):
        """kernels.cells.cell_masks (or its reference on the torch route) -> (masks, boxes) numpy arrays."""
        from kernels import cells as kc

        return (kc.cell_masks_reference if self.route == "torch" else kc.cell_masks)(*args)

    # -- float work in normalised units ----------------------------------------------------------
    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 view -> the training dtype and memory format."""
        return x.to(self.dtype).contiguous(memory_format=self.fmt)

    def _impl(self, device: torch.device):
        """("cuda" | "cpu" | "reference", module) for the float kernels on ``device``."""
        import kernels.fill as kf

        if self.route == "torch" or kernels_for(device.type) is None:
            return "reference", kf
        if device.type == "cuda":
            import kernels.fill_cuda as kc  # numba.cuda only when a GPU is in use

            return "cuda", kc
        return "cpu", kf

    def _call(self, name: str, writes: list[torch.Tensor], make_args) -> None:
        """Run kernel ``name``; make_args(as_array) builds its arguments, ``writes`` are its outputs."""
        kind, k = self._impl(writes[0].device)
        if kind == "cuda":
            getattr(k, name)(*make_args(lambda t: t), cuda_stream=_numba_stream(writes[0].device))
            return
        host = {id(t): (t.numpy() if t.device.type == "cpu" else t.cpu().numpy()) for t in writes}
        as_array = lambda t: host[id(t)] if id(t) in host else t.cpu().numpy()  # noqa: E731
        getattr(k, name if kind == "cpu" else name.rstrip("_") + "_reference")(*make_args(as_array))
        for t in writes:
            if t.device.type != "cpu":
                t.copy_(torch.from_numpy(host[id(t)]))

    def float_views(self, v1, v2):
        """Both views normalised in float32 (for the float kernels)."""
        x1, x2, _ = self.mix(v1, v2, None, None, dtype=torch.float32)
        return x1, x2

    def high_pass(self, x: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
        """x - GaussianBlur(x) (kernels/fill.py), float32 (N, 3, H, W) -> new tensor."""
        out = torch.empty_like(x)
        self._call("high_pass", [out], lambda a: (a(x), a(out), ksize, sigma))
        return out

    def mixup(self, x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """lam x + (1 - lam) x[perm] (kernels/fill.py), float32 (N, 3, H, W) -> new tensor."""
        out = torch.empty_like(x)
        perm, lam = perm.to(x.device, torch.int64), lam.to(x.device, torch.float32)
        self._call("mixup", [out], lambda a: (a(x), a(perm), a(lam), a(out)))
        return out

    def noise_fill_(self, x: torch.Tensor, masks: np.ndarray, boxes: np.ndarray, std: float, keys: Keys,
                    stream: int) -> torch.Tensor:
        """Masked cells / outside the focal windows of x <- seeded noise (kernels/fill.py), in place."""
        m, b = torch.from_numpy(masks).to(x.device), torch.from_numpy(boxes).to(x.device)
        self._call("noise_fill_", [x], lambda a: (a(x), a(m), a(b), std, keys.seed, keys.epoch, keys.batch_index,
                                                  stream))
        return x


def full_size(cfg) -> int:
    """The side at which the grids are given when progressive resolution is on (data.image_size; their cells
    keep that pixel size at every view side), 0 when it is off (the grid follows the view: g cells a side)."""
    return cfg.data.image_size if cfg.data.size_start else 0


def _numba_stream(device: torch.device):
    from numba import cuda

    return cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)


def partner(n: int, how: str, keys: Keys, device) -> torch.Tensor:
    """perm for mixing (mixmask/masks.py rules), or "random": a permutation drawn from the batch stream.
    -> (N,) int64"""
    if how != "random":
        return mk.partner_permutation(n, how, device)
    from kernels.rng import STREAM_SHIFT, STREAMS, uniform4

    u = np.array([uniform4(np.uint64(keys.seed), keys.epoch, keys.batch_index, j, (STREAMS["batch"] << STREAM_SHIFT) + 1)[0]
                  for j in range(n)])
    return torch.from_numpy(np.argsort(u, kind="stable")).to(device)


def mixed_view(x, perm, lam, mask, method) -> Mixed:
    return Mixed(x, perm, lam.to(x.device, torch.float32).contiguous(), mask, method)
