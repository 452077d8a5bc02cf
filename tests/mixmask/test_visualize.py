"""mixmask/visualize.py on a hand-built Batch (N=3, 16 x 16): the tiles are the un-normalised views, the
outline is exactly the partner cells' border, and BatchPreview writes on schedule and forwards the rest.

Expected pixels are rebuilt here from uint8 images and the MixMask formula (mixmask/masks.py:
x~_j = M x1_j + (1 - M) x1_perm[j], M upsampled by cell = (y g) // H); the views are normalised from those
uint8 pixels, so un-normalising must give them back exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmask.batch import Batch, Mixed
from mixmask.visualize import GAP, HEADER, LABEL_H, OUTLINE, BatchPreview, batch_grid, save_grid, tile_boxes

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
N, H, G, TILE = 3, 16, 4, 48  # 4 x 4 grid of 4-px cells; tiles 3x upscaled
PERM = [1, 2, 0]
MASK = np.array([[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0]], np.uint8)  # 0 = from the partner


def normalise(p: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 channels_last, the Batch form."""
    x = (torch.from_numpy(p).float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def up(a: np.ndarray, f: int, axis: int = 0) -> np.ndarray:
    """Nearest upsampling by an integer factor f of axes (axis, axis + 1)."""
    return np.repeat(np.repeat(a, f, axis), f, axis + 1)


def make(per_sample: bool = False, hard: bool = False, keep: bool = False, dtype=torch.float32):
    rng = np.random.default_rng(0)
    p1, p2 = rng.integers(0, 256, (2, N, H, H, 3), dtype=np.uint8)
    masks = np.stack([MASK, MASK.T, 1 - MASK]) if per_sample else MASK[None]  # (N or 1, g, g)
    m_px = up(masks, H // G, 1)[..., None]  # (N or 1, H, W, 1)
    pm = np.where(m_px == 1, p1, p1[PERM])  # (N, H, W, 3)
    lam = torch.tensor(masks.reshape(len(masks), -1).mean(1), dtype=torch.float32).expand(N)
    mixed = Mixed(normalise(pm).to(dtype), torch.tensor(PERM), lam, torch.from_numpy(masks), "mixmask")
    ph = rng.integers(0, 256, (N, H, H, 3), dtype=np.uint8)
    kept = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4], [12, 13, 14, 15]])  # (N, K) of a 4 x 4 token grid
    batch = Batch(normalise(p1).to(dtype), normalise(p2).to(dtype), torch.zeros(N, dtype=torch.int64), mixes=(mixed,),
                  hard_negative=normalise(ph).to(dtype) if hard else None, keep=kept if keep else None)
    return batch, {"x1": p1, "x2": p2, "mixmask": pm, "hard negative": ph}, masks, kept


def tile(grid, boxes, r, c):
    top, left = boxes[r][c]
    return grid[top:top + TILE, left:left + TILE]


def test_geometry_and_tiles_equal_the_views():
    batch, px, _, kept = make(hard=True, keep=True)
    grid = batch_grid(batch, MEAN, STD, tile=TILE, annotate=False, token_grid=4)
    cols, boxes = tile_boxes(batch, tile=TILE)
    assert cols == ["x1", "x2", "mixmask", "hard negative", "x1 tokens kept"]
    assert grid.shape == (HEADER + N * (TILE + GAP) - GAP, 5 * (TILE + GAP) - GAP, 3) and grid.dtype == np.uint8
    for r in range(N):
        for c, name in enumerate(cols[:4]):
            np.testing.assert_array_equal(tile(grid, boxes, r, c), up(px[name][r], TILE // H), err_msg=f"{r} {name}")
        tokens = np.zeros(16, bool)
        tokens[kept[r].numpy()] = True
        expect = np.where(up(tokens.reshape(4, 4), TILE // 4)[..., None], up(px["x1"][r], TILE // H), 128)
        np.testing.assert_array_equal(tile(grid, boxes, r, 4), expect)
    two = batch_grid(batch, MEAN, STD, max_samples=2, tile=TILE, token_grid=4)
    assert two.shape[0] == HEADER + 2 * (TILE + GAP) - GAP
    np.testing.assert_array_equal(batch_grid(batch, MEAN, STD, tile=TILE, annotate=False), grid)  # grid guessed: 4
    one_view = Batch(batch.x1, None, batch.labels)  # a one-view loader's batch: x1 only
    assert tile_boxes(one_view, tile=TILE)[0] == ["x1"]
    np.testing.assert_array_equal(batch_grid(one_view, MEAN, STD, tile=TILE), grid[:, :TILE])


def test_bf16_views_match_their_float32_values():
    batch, *_ = make(dtype=torch.bfloat16)
    as_f32 = Batch(batch.x1.float(), batch.x2.float(), batch.labels,
                   mixes=(Mixed(batch.mixed.float(), batch.perm, batch.lam, batch.mask, "mixmask"),))
    np.testing.assert_array_equal(batch_grid(batch, MEAN, STD, tile=TILE), batch_grid(as_f32, MEAN, STD, tile=TILE))


@pytest.mark.parametrize("per_sample", [False, True])
def test_annotations_only_on_the_partner_border_and_the_label_band(per_sample, tmp_path):
    batch, _, masks, _ = make(per_sample=per_sample)
    plain = batch_grid(batch, MEAN, STD, tile=TILE, annotate=False)
    ann = batch_grid(batch, MEAN, STD, tile=TILE)
    _, boxes = tile_boxes(batch, tile=TILE)
    assert ann.shape == plain.shape
    for r in range(N):
        for c in (0, 1):  # clean views: untouched
            np.testing.assert_array_equal(tile(ann, boxes, r, c), tile(plain, boxes, r, c))
        partner = up(masks[r if per_sample else 0], TILE // G) == 0  # (TILE, TILE)
        kept = np.pad(~partner, 1)
        border = partner & (kept[:-2, 1:-1] | kept[2:, 1:-1] | kept[1:-1, :-2] | kept[1:-1, 2:])  # 1 px band
        a, p = tile(ann, boxes, r, 2), tile(plain, boxes, r, 2)
        changed = (a != p).any(-1)
        below = np.s_[LABEL_H:]
        np.testing.assert_array_equal(changed[below], border[below] & (p[below] != OUTLINE).any(-1))
        assert (a[border] == OUTLINE).all() and border[below].any()
        assert changed[:LABEL_H].any()  # the lam label
    png = save_grid(tmp_path / "grid.png", ann)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(png)), ann)


class FakeLoader:
    def __init__(self, batches):
        self.batches, self.epochs, self.bad_files, self.dataset = batches, [], {"x.jpg"}, "data"

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch, start_batch=0):
        self.epochs.append((epoch, start_batch))

    def __iter__(self):
        return iter(self.batches)


def test_batch_preview_writes_every_kth_batch_and_forwards():
    batch, *_ = make()
    loader = FakeLoader([batch] * 5)
    calls = []
    preview = BatchPreview(loader, 2, lambda grid, step: calls.append((grid.shape, step)), MEAN, STD, tile=TILE)
    assert len(preview) == 5 and preview.bad_files == {"x.jpg"} and preview.dataset == "data"
    assert not hasattr(preview, "missing")
    preview.set_epoch(3, start_batch=2)
    preview.set_epoch(4)
    assert loader.epochs == [(3, 2), (4, 0)]
    assert [b for b in preview] == [batch] * 5
    assert [s for _, s in calls] == [2, 4]
    list(preview)  # the count runs on across epochs
    assert [s for _, s in calls] == [2, 4, 6, 8, 10]
    assert calls[0][0] == batch_grid(batch, MEAN, STD, tile=TILE).shape
    silent = BatchPreview(loader, 0, calls.append, MEAN, STD)
    list(silent)
    assert len(calls) == 5
