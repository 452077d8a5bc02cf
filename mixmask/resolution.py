"""Progressive resolution (FFCV's ImageNet recipe): the training views grow from ``data.size_start`` to
``data.image_size`` over the epochs ``data.size_ramp``. docs/configuration.md "Progressive resolution".

``view_size`` is the one rule; every loader (loaders/*: AugParams.size_at) and the config checks call it.
It is a pure function of the epoch, so a resumed run needs no new state: the checkpoint's epoch gives the
size again. Sizes change only at epoch boundaries (the loaders' ``set_epoch``).
"""

from __future__ import annotations

import math


def view_size(epoch: int, image_size: int, size_start: int = 0, size_ramp: tuple[float, float] = (0.0, 0.0),
              size_step: int = 32) -> int:
    """The side (px) of the training views of ``epoch`` (0-based).

    size_start 0: image_size at every epoch (off). Otherwise size_start up to epoch size_ramp[0] (included),
    image_size from epoch size_ramp[1] on, and in between the linear interpolation from size_start to
    image_size rounded DOWN to a multiple of size_step (FFCV rounds to 32), never below size_start."""
    if not size_start:
        return image_size
    r0, r1 = size_ramp
    if epoch <= r0:
        return size_start
    if epoch >= r1:
        return image_size
    size = size_start + (image_size - size_start) * (epoch - r0) / (r1 - r0)
    return max(size_start, min(image_size, math.floor(size / size_step) * size_step))


def view_sizes(epochs: int, image_size: int, size_start: int = 0, size_ramp: tuple[float, float] = (0.0, 0.0),
               size_step: int = 32) -> list[int]:
    """view_size of every epoch 0..epochs-1."""
    return [view_size(e, image_size, size_start, size_ramp, size_step) for e in range(epochs)]


def grid_at(grid: int, full_size: int, size: int) -> int:
    """The cells per side of a ``size`` px view when a grid of ``grid`` cells over ``full_size`` px keeps its
    cell's pixel size (full_size / grid) as the views grow (docs/methods.md §2); full_size 0: ``grid``
    (the grid follows the image). Exact when the cell divides both sizes (validated by the config)."""
    return grid if not full_size else grid * size // full_size
