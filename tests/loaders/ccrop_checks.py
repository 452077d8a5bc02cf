"""Shared ContrastiveCrop checks of the loader tests (mixmask/crops.py; Peng et al., CVPR 2022): over
the gradient_data images (tests/conftest.py), whose colour encodes the position, every view's centre
is measured from its mean colour and compared with the window kernels/views.py predicts for the
sample's (seed, epoch, index, view) and the box table of that epoch."""

from __future__ import annotations

import numpy as np
import torch

from loaders.torchvision_backend import AugParams
from loaders.view_params import draw_views

W, H = 80, 60  # tests/conftest.py GRADIENT_SIZE
# small crops, no colour ops or flips: a view's mean colour is its window's centre
AUG = AugParams(16, crop_scale=(0.04, 0.1), jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip_p=0.0, crop_alpha=0.6)
BOX = np.float32([0.625, 0.625, 0.9375, 0.9375])  # (y0, x0, y1, x1): the bottom-right corner (exact in float32)


def raw_stage(v1, v2, labels, index, epoch, step):
    """A stand-in MixStage: the uint8 views (N, S, S, 3) and the indices, on the host."""
    return v1.cpu(), v2.cpu(), index.cpu()


def take(ld, epoch):
    ld.set_epoch(epoch)
    return list(ld)


def centres(v: torch.Tensor) -> np.ndarray:
    """(N, S, S, 3) uint8 views of gradient images -> (N, 2) window centres (y, x) in px."""
    m = v.double().mean((1, 2))  # (N, 3)
    return torch.stack([(m[:, 1] - 8) / 4 + 0.5, (m[:, 0] - 8) / 3 + 0.5], 1).numpy()


def predicted(seed: int, epoch: int, idx, view: int, box=None, alpha: float = 0.0) -> np.ndarray:
    """(N, 2) centres (y, x) px of the windows kernels/views.py draws (box None: plain RandomResizedCrop)."""
    idx = np.asarray(idx, np.int64)
    n = len(idx)
    boxes = None if box is None else np.tile(np.float32(box), (n, 1))
    roi = draw_views(AUG, seed, epoch, idx, np.tile([[W, H]], (n, 1)), view, colour=False, boxes=boxes,
                     alpha=alpha).roi.astype(np.float64)
    return np.stack([(roi[:, 0] + roi[:, 2]) / 2 * H, (roi[:, 1] + roi[:, 3]) / 2 * W], 1)


def check_epoch(batches, seed: int, epoch: int, box=None, alpha: float = 0.0, tol: float = 0.5) -> None:
    """Every view of the epoch is centred where kernels/views.py puts it (within tol px)."""
    assert batches
    far = []
    for v1, v2, idx in batches:
        for view, v in ((0, v1), (1, v2)):
            got = centres(v)
            want = predicted(seed, epoch, idx, view, box, alpha)
            err = np.abs(got - want).max()
            assert err < tol, (epoch, view, err)
            if box is not None:
                far.append(np.abs(got - predicted(seed, epoch, idx, view)).max(1) > 4)  # away from plain RRC
                # ContrastiveCrop: the centre top + h // 2 lies in [int(H y0), int(H y1)] (both edges are within
                # reach of these crops), the measured one (top + h / 2) up to half a pixel further
                lo, hi = np.floor(BOX[:2] * [H, W]), np.floor(BOX[2:] * [H, W])
                assert (got > lo - tol).all() and (got < hi + 0.5 + tol).all(), (got, lo, hi)
    if box is not None:
        assert np.concatenate(far).mean() > 0.5  # the box moved most views


def update_table(table) -> None:
    """Every image's box <- BOX, and the table on (what ContrastiveCrop.update does), in place."""
    table.write(np.arange(len(table)), np.tile(BOX, (len(table), 1)))
    table.active = True
