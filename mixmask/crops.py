"""ContrastiveCrop (Peng et al., CVPR 2022, "Crafting Better Contrastive Views for Siamese
Representation Learning", arXiv 2202.03278): semantic-aware crops from the model's own heat maps.

Every `interval` epochs from epoch `warmup` on, each training image is run (whole, resized to a
square) through the encoder; its heat map is the channel sum of the last feature map,

    M = sum_c F_c                              (N, h, w)   (here sum_c |F_c|: equal for ReLU maps,
                                                            and defined for ViT token maps)
    M' = (M - min M) / (max M - min M)         per sample
    M'' = bilinear upsampling of M' to the input size (size x size)
    box = tight bounding box of {M'' > threshold}   (y0, x0, y1, x1) / size, y1, x1 exclusive

and the box goes into a per-image table (BoxTable). The crops of the next epochs keep
RandomResizedCrop's scale and ratio but place the crop's centre within the box, with Beta(alpha,
alpha) offsets (alpha < 1 leans to the box's edges, which keeps views varied):

    top  = ch0 + int((ch1 - ch0) b_y),  ch0 = max(int(H y0) - h // 2, 0),  ch1 = min(int(H y1) - h // 2, H - h)
    left = cw0 + int((cw1 - cw0) b_x),  cw0, cw1 likewise with W, w, x0, x1;   b_y, b_x ~ Beta(alpha, alpha)

The draw itself is kernels/views.draw_one over kernels/ccrop.py (Numba, counter-based: the same
window for (seed, epoch, index, view) in every backend). Before the first update the table is
inactive and crops are plain RandomResizedCrop, as in the paper's warm-up.

The table lives in shared memory and is rewritten in place, so the torchvision backend's persistent
DataLoader workers, the DALI feeder and FFCV's compiled decoder (which reads it through its address)
all see an update at the next epoch without being rebuilt (DALI rebuilds its pipeline once, to drop
the batches it prefetched with the old boxes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T


@dataclass
class ContrastiveCropConfig:
    enabled: bool = False  # ContrastiveCrop instead of RandomResizedCrop after the warm-up
    alpha: float = 0.6  # Beta(alpha, alpha) of the crop offsets (paper: 0.6 ImageNet, 0.1 small datasets)
    warmup: int = 20  # epochs of plain RandomResizedCrop before the first box update
    interval: int = 20  # loc_interval: epochs between box updates
    threshold: float = 0.1  # on the min-max normalised heat map: the box bounds the pixels above it
    size: int = 0  # side (px) of the whole images of the box pass; 0 = data.image_size. ResNets (stride 32) need
    #               >= 4 x 32 px for a map with any resolution (a 32 px view gives 1 x 1); ViTs: their image size

    def problems(self) -> list[str]:
        return [m for ok, m in [(self.alpha > 0, "alpha must be > 0"), (self.warmup >= 0, "warmup must be >= 0"),
                                (self.interval >= 1, "interval must be >= 1"),
                                (0 <= self.threshold < 1, "threshold must be in [0, 1)"),
                                (self.size >= 0, "size must be >= 0")] if not ok]


def _whole(n: int) -> np.ndarray:
    out = np.zeros((n, 4), np.float32)  # (n, 4)
    out[:, 2:] = 1
    return out


class BoxTable:
    """Per-image ContrastiveCrop boxes, (n, 4) float32 rows (y0, x0, y1, x1) in normalised image
    coordinates, in shared memory (torch's share_memory_), plus a shared `active` flag.

    Create it before the loader's workers start; write it only in place (``write``, ``reset``,
    ``load_state_dict``, or ``.array[...] = ...`` followed by ``touch()``), so that every process
    holding it reads the same memory. ``version`` counts the writes made through this object (the
    DALI loader rebuilds its prefetching pipeline when it changes). Pickling (spawned workers)
    passes the shared memory, not a copy.
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"a box table needs n >= 1 rows, got {n}")
        self._boxes = torch.from_numpy(_whole(n)).share_memory_()  # (n, 4) float32
        self._active = torch.zeros(1, dtype=torch.int64).share_memory_()  # (1,) int64: 1 = boxes in use
        self.version = 0
        self._views()

    def _views(self) -> None:
        self.array = self._boxes.numpy()  # (n, 4) float32, a view of the shared memory
        self.active_cell = self._active.numpy()  # (1,) int64, read by compiled code (kernels.views.read_cell)

    def __getstate__(self):
        return {"_boxes": self._boxes, "_active": self._active, "version": self.version}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._views()

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def active(self) -> bool:
        """Whether the crops use the boxes (False until the first update: plain RandomResizedCrop)."""
        return bool(self.active_cell[0])

    @active.setter
    def active(self, on: bool) -> None:
        self.active_cell[0] = int(bool(on))
        self.touch()

    def touch(self) -> None:
        """Record a write (made directly to ``.array``)."""
        self.version += 1

    def write(self, indices, boxes) -> None:
        """Rows ``indices`` (K,) <- ``boxes`` (K, 4), in place."""
        idx = np.asarray(torch.as_tensor(indices).cpu(), np.int64).reshape(-1)
        self.array[idx] = np.asarray(torch.as_tensor(boxes).detach().float().cpu()).reshape(-1, 4)
        self.touch()

    def reset(self) -> None:
        """Whole images again, inactive."""
        self.array[:] = _whole(len(self))
        self.active_cell[0] = 0
        self.touch()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"boxes": self._boxes.clone(), "active": self._active.clone()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        """Copy a state_dict IN PLACE (processes sharing the table keep seeing it). Without "active",
        the table is active when some box differs from the whole image."""
        boxes = torch.as_tensor(d["boxes"]).float().cpu()
        if tuple(boxes.shape) != tuple(self._boxes.shape):
            raise ValueError(f"box table of shape {tuple(boxes.shape)} for {tuple(self._boxes.shape)}")
        self._boxes.copy_(boxes)
        active = d.get("active")
        on = bool(torch.as_tensor(active).reshape(-1)[0]) if active is not None else \
            not np.array_equal(self.array, _whole(len(self)))
        self.active_cell[0] = int(on)
        self.touch()


def whole_image_transform(size: int) -> T.Resize:
    """The whole image resized to size x size (no centre crop): the boxes are in whole-image coordinates."""
    return T.Resize((size, size))


def boxes_from_heat(heat: torch.Tensor, threshold: float, size: int | tuple[int, int]) -> torch.Tensor:
    """ContrastiveCrop's boxes from heat maps (Peng et al., CVPR 2022, §3.2).

    heat: (N, h, w) float, e.g. feature_map(x).abs().sum(1); size: the input image size (S or (Hi, Wi)).
    M' = (M - min M) / (max M - min M) per sample, bilinearly upsampled to size (align_corners=False),
    then the tight bounding box of {M' > threshold}: rows r0..r1 and columns c0..c1 (inclusive) give
    (y0, x0, y1, x1) = (r0 / Hi, c0 / Wi, (r1 + 1) / Hi, (c1 + 1) / Wi) (y1, x1 exclusive edges; the
    paper's code writes r1 / Hi). A map with nothing above the threshold (e.g. a constant one) gives
    the whole image (0, 0, 1, 1).  -> (N, 4) float32 on heat's device
    """
    Hi, Wi = (size, size) if isinstance(size, int) else size
    N = heat.shape[0]
    m = heat.float().reshape(N, -1)  # (N, h*w)
    lo, hi = m.min(1, keepdim=True).values, m.max(1, keepdim=True).values
    span = hi - lo
    m = (m - lo) / torch.where(span > 0, span, torch.ones_like(span))  # constant maps -> 0 everywhere
    up = F.interpolate(m.view(N, 1, *heat.shape[1:]), size=(Hi, Wi), mode="bilinear", align_corners=False)[:, 0]
    above = up > threshold  # (N, Hi, Wi)
    rows, cols = above.any(2), above.any(1)  # (N, Hi), (N, Wi)
    out = torch.zeros(N, 4, dtype=torch.float32, device=heat.device)  # (N, 4)
    out[:, 2:] = 1
    for k, r in enumerate((rows, cols)):  # k = 0: y0, y1; k = 1: x0, x1
        n = r.shape[1]
        pos = torch.arange(n, device=heat.device)
        first = torch.where(r, pos, n).min(1).values  # (N,)
        last = torch.where(r, pos, -1).max(1).values  # (N,)
        found = last >= 0
        out[found, k] = first[found].float() / n
        out[found, k + 2] = (last[found] + 1).float() / n
    return out


FeatureMap = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) -> (N, C, h, w)


class ContrastiveCrop:
    """The box table and its schedule: ``due(epoch)`` says when to ``update`` (before that epoch's pass)."""

    def __init__(self, cfg: ContrastiveCropConfig, n: int):
        self.cfg = cfg
        self.table = BoxTable(n)

    def due(self, epoch: int) -> bool:
        c = self.cfg
        return c.enabled and epoch >= c.warmup and (epoch - c.warmup) % c.interval == 0

    @torch.no_grad()
    def update(self, feature_map: FeatureMap, loader, size: int, gather=None, progress: bool = False) -> int:
        """Recompute every box from feature_map over ``loader`` (an eval loader of whole images
        resized to size x size, whole_image_transform, yielding (x, labels, index); its padded
        shards repeat indices, which rewrite the same rows) and activate the table. With ``gather``
        (e.g. accelerator.gather) each process's boxes and indices are gathered first, so every
        process writes the whole table. A bound method of an nn.Module runs with the module in eval
        mode (restored afterwards). -> the number of rows written"""
        from tqdm import tqdm

        owner = getattr(feature_map, "__self__", None)
        training = owner.training if isinstance(owner, torch.nn.Module) else None
        if training:
            owner.eval()
        written = 0
        try:
            for x, _, idx in tqdm(loader, desc="ccrop boxes", unit="batch", disable=not progress):
                heat = feature_map(x).float().abs().sum(1)  # (N, h, w)
                boxes = boxes_from_heat(heat, self.cfg.threshold, size)  # (N, 4)
                idx = torch.as_tensor(idx).to(boxes.device)
                if gather is not None:
                    boxes, idx = gather(boxes), gather(idx)
                self.table.write(idx, boxes)
                written += len(idx)
        finally:
            if training:
                owner.train()
        self.table.active = True
        return written

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.table.state_dict()

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        self.table.load_state_dict(d)
