"""Pictures of training batches: what the input pipeline actually fed the model (docs/methods.md §1-2).

batch_grid draws one row per sample and one column per view:

    x1 | x2 | each mixed view of batch.mixes (titled by its method) | hard negative | x1, dropped tokens grey

(columns only for what the batch has: no x2 from one-view loaders, no hard negative, no batch.keep).

Every tile is the view un-normalised, p = round(255 clip(x std + mean, 0, 1)), and upscaled to ``tile`` px by
nearest neighbour (source row (y h) // tile), so mask cells stay sharp. With annotate=True a mixed tile also
shows the outline of the cells filled from the partner (mask 0 in MixMask's convention, mixmask/masks.py:
1 = kept from x1_j, 0 = from x1_perm[j]; upsampled by the same integer cell rule as the mix) and a label
"lam 0.62 <- j" (the realised lam_j and the partner index perm[j]) in the tile's top LABEL_H rows.
tile_boxes gives each tile's position, so the pixels can be checked against the batch.

BatchPreview wraps a loader and hands such a grid to a writer (e.g. TensorBoard's add_image) every
``every`` batches; everything else is forwarded to the wrapped loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mixmask.batch import Batch

Stats = tuple[float, float, float]
HEADER = 16  # px: the row of column titles
GAP = 2  # px between tiles
LABEL_H = 14  # px: the annotation band at the top of a mixed tile (the default font is ~12 px high)
BACKGROUND, GREY = 255, 128  # uint8 levels: the page; dropped tokens (MAE's grey patches)
OUTLINE = (255, 0, 0)  # the border of the partner's cells


def columns(batch: Batch) -> list[str]:
    """The column titles of batch_grid for this batch."""
    cols = ["x1", *["x2"] * (batch.x2 is not None), *[m.method or "mixed" for m in batch.mixes]]
    cols += ["hard negative"] * (batch.hard_negative is not None) + ["x1 tokens kept"] * (batch.keep is not None)
    return cols


def tile_boxes(batch: Batch, max_samples: int = 8, tile: int = 96) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """(column titles, boxes[row][col] = (top, left)) of the grid's tiles; each tile is tile x tile px."""
    cols, rows = columns(batch), min(batch.size, max_samples)
    return cols, [[(HEADER + r * (tile + GAP), c * (tile + GAP)) for c in range(len(cols))] for r in range(rows)]


def unnormalize(x: torch.Tensor, mean: Stats, std: Stats) -> np.ndarray:
    """(n, 3, H, W) normalised, any dtype / device / memory format -> (n, H, W, 3) uint8 pixels."""
    x = x.detach().to("cpu", torch.float32).permute(0, 2, 3, 1)  # (n, H, W, 3)
    p = x * torch.tensor(std, dtype=torch.float32) + torch.tensor(mean, dtype=torch.float32)
    return (p.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def upscale(a: np.ndarray, tile: int) -> np.ndarray:
    """Nearest upsampling of the first two axes of ``a`` to tile x tile: source index (y size) // tile."""
    return a[np.arange(tile) * a.shape[0] // tile][:, np.arange(tile) * a.shape[1] // tile]


def partner_cells(mask: torch.Tensor, h: int, w: int, tile: int) -> np.ndarray:
    """(gh, gw) mask (0 = from the partner) -> (tile, tile) bool, True where the tile shows the partner.
    The image pixel of tile pixel y is (y h) // tile, its cell (row g) // h (mixmask.masks.cell_index)."""
    m = mask.detach().cpu().numpy()
    rows = (np.arange(tile) * h // tile) * m.shape[0] // h
    cols = (np.arange(tile) * w // tile) * m.shape[1] // w
    return m[rows][:, cols] == 0


def outline(partner: np.ndarray, width: int) -> np.ndarray:
    """The band of ``width`` px inside the partner region along its border with the kept region."""
    near = ~partner
    for _ in range(width):  # 4-neighbour dilation of the kept region, clipped at the tile edges
        grown = near.copy()
        grown[1:] |= near[:-1]
        grown[:-1] |= near[1:]
        grown[:, 1:] |= near[:, :-1]
        grown[:, :-1] |= near[:, 1:]
        near = grown
    return near & partner


def guess_token_grid(h: int, last: int) -> int:
    """The smallest g dividing the image side h with g * g > the largest kept token index: right unless every
    kept patch lies in the first rows (pass token_grid = image_size / patch_size to be exact)."""
    return next(g for g in range(1, h + 1) if h % g == 0 and g * g > last)


def _text(img: Image.Image, xy: tuple[int, int], s: str, fill, stroke: bool) -> None:
    ImageDraw.Draw(img).text(xy, s, fill=fill, font=ImageFont.load_default(), stroke_width=int(stroke),
                             stroke_fill=(0, 0, 0))


def batch_grid(batch: Batch, mean: Stats, std: Stats, max_samples: int = 8, tile: int = 96, annotate: bool = True,
               token_grid: int | None = None) -> np.ndarray:
    """The batch as one picture (see the module docstring).  -> (H, W, 3) uint8

    token_grid: patches per side of x1 (image_size / patch_size) for drawing batch.keep; None: guessed.
    """
    cols, boxes = tile_boxes(batch, max_samples, tile)
    n, (h, w) = len(boxes), batch.x1.shape[-2:]
    views = [batch.x1, batch.x2, *[m.x for m in batch.mixes], batch.hard_negative]
    pixels = [unnormalize(v[:n], mean, std) for v in views if v is not None]  # each (n, H, W, 3) uint8
    if batch.keep is not None:
        token_grid = token_grid or guess_token_grid(h, int(batch.keep.max()))
        kept = np.zeros((n, token_grid * token_grid), bool)  # token l = patch (l // g, l % g), row-major
        np.put_along_axis(kept, batch.keep[:n].cpu().numpy(), True, 1)
        kept = kept.reshape(n, token_grid, token_grid)
        kept = kept[:, np.arange(h) * token_grid // h][:, :, np.arange(w) * token_grid // w]  # (n, H, W)
        pixels.append(np.where(kept[..., None], pixels[0], np.uint8(GREY)))
    grid = np.full((HEADER + n * (tile + GAP) - GAP, len(cols) * (tile + GAP) - GAP, 3), BACKGROUND, np.uint8)
    for c, title in enumerate(cols):
        head = Image.new("RGB", (tile, HEADER), (BACKGROUND,) * 3)
        _text(head, (2, 1), title, (0, 0, 0), stroke=False)
        grid[:HEADER, c * (tile + GAP):c * (tile + GAP) + tile] = np.asarray(head)
    for r in range(n):
        for c, px in enumerate(pixels):
            top, left = boxes[r][c]
            t = upscale(px[r], tile)  # (tile, tile, 3)
            mix = c - 1 - (batch.x2 is not None)
            if annotate and 0 <= mix < len(batch.mixes):
                t = _annotate(t, batch.mixes[mix], r, h, w, tile)
            grid[top:top + tile, left:left + tile] = t
    return grid


def _annotate(t: np.ndarray, m, r: int, h: int, w: int, tile: int) -> np.ndarray:
    """Outline the partner's cells and write "lam <lam_r> <- <perm_r>" on one mixed tile."""
    t = t.copy()
    if m.mask is not None:
        mask = m.mask[r] if m.mask.shape[0] > 1 else m.mask[0]
        t[outline(partner_cells(mask, h, w, tile), max(1, tile // 48))] = OUTLINE
    label = f"lam {float(m.lam[r]):.2f}" + (f" <- {int(m.perm[r])}" if m.perm is not None else "")
    img = Image.fromarray(t)
    _text(img, (2, 0), label, (255, 255, 255), stroke=True)
    return np.asarray(img).copy()


def save_grid(path: str | Path, grid: np.ndarray) -> Path:
    """Write the (H, W, 3) uint8 grid as a PNG."""
    Image.fromarray(grid).save(path, format="PNG")
    return Path(path)


class BatchPreview:
    """A loader that also shows its batches: every ``every``-th batch it yields (counted from ``start``,
    across epochs; micro-batches under gradient accumulation), writer_fn(batch_grid(...), count) runs first.
    every <= 0: never. len, set_epoch, bad_files and every other attribute are the wrapped loader's."""

    def __init__(self, loader, every: int, writer_fn: Callable[[np.ndarray, int], None], mean: Stats, std: Stats,
                 start: int = 0, **grid_kwargs):
        self.loader, self.every, self.writer_fn, self.mean, self.std = loader, every, writer_fn, mean, std
        self.count, self.grid_kwargs = start, grid_kwargs

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def __getattr__(self, name: str):  # only called for attributes this wrapper lacks (bad_files, dataset, ...)
        if name == "loader":  # not yet set (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            self.count += 1
            if self.every > 0 and self.count % self.every == 0:
                self.writer_fn(batch_grid(batch, self.mean, self.std, **self.grid_kwargs), self.count)
            yield batch
