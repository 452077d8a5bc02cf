"""The torchvision baseline backend: PIL decode once, two MoCo v2 views (or one), DataLoader workers.

Per image (in a worker): decode once with PIL, then per view RandomResizedCrop -> colour jitter (p) ->
grayscale (p) -> Gaussian blur (p) -> solarize (p) -> flip, as uint8 HWC. The crop window comes from
kernels/views.py (torchvision's RandomResizedCrop rule, keyed by (seed, epoch, index, view): the same
windows as the DALI and FFCV backends), resized bilinearly as RandomResizedCrop does; with an active
ContrastiveCrop box table (mixmask/crops.py; Peng et al., CVPR 2022) and aug.crop_alpha > 0 the
window's offset is Beta(alpha, alpha) around the image's box. The table is shared memory, read at
each sample, so persistent workers see its updates. The batch ships to the device as uint8 NHWC;
normalisation, layout and MixMask happen there (mixmask/mixing/stage.py). views=1 makes view 0 only
(the same pixels as view 0 of views=2) and calls the stage with v2=None; ``indices`` restricts
training to those positions of the split (a label subset, loaders/sharding.draw_from).

Evaluation (TorchvisionEvalLoader): one transform (eval_transform: resize the shorter side, centre
crop), the split sharded with padding; callers drop repeated indices.

Randomness: each sample's crop is keyed by (seed, epoch, index, view) and its other augmentations
(torch RNG) are seeded by (seed, epoch, index), so a run is reproducible for any worker count and
resumes exactly. An unreadable image is replaced by the next readable one of
the dataset (the batch keeps its size N) and reported once by path; the count is kept in ``bad_files``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from kernels.views import draw_one
from mixmask.mixing import MixStage
from loaders.folder import DataError, FolderIndex
from loaders.sharding import batches_per_epoch, draw_from, shard_indices
from mixmask.batch import Batch

if TYPE_CHECKING:
    from mixmask.crops import BoxTable

log = logging.getLogger(__name__)

# Truncated or corrupt files raise one of these from PIL.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class AugParams:
    """The MoCo v2 view recipe (docs/methods.md §6); the same parameters drive every backend. size: the view
    side; with size_start > 0 (progressive resolution, mixmask/resolution.py) the final side, the side of
    epoch e being size_at(e): the loaders make each epoch's views at that side (set_epoch)."""

    size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    crop_alpha: float = 0.0  # ContrastiveCrop's Beta(alpha, alpha) offsets once boxes are active; 0 = RandomResizedCrop
    size_start: int = 0  # progressive resolution (data.size_start): the first epochs' side (px); 0 = size at every epoch
    size_ramp: tuple[float, float] = (0.0, 0.0)  # data.size_ramp: the epochs over which the side grows to size
    size_step: int = 32  # data.size_step: the growing side is rounded down to a multiple of this (px)

    def size_at(self, epoch: int) -> int:
        """The view side of ``epoch`` (mixmask/resolution.view_size): a pure function of the epoch."""
        from mixmask.resolution import view_size

        return view_size(epoch, self.size, self.size_start, self.size_ramp, self.size_step)


class _PILGaussianBlur:
    """PIL Gaussian blur with radius ~ U(sigma range), as in the MoCo v2 code; torch RNG."""

    def __init__(self, sigma: tuple[float, float]):
        self.lo, self.hi = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        radius = self.lo + float(torch.rand(())) * (self.hi - self.lo)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def colour_transform(p: AugParams) -> T.Compose:
    """The MoCo v2 ops after the crop (colour jitter, grayscale, blur, solarize, flip; torch RNG)."""
    return T.Compose(
        [
            T.RandomApply([T.ColorJitter(*p.jitter)], p=p.jitter_p),
            T.RandomGrayscale(p=p.gray_p),
            T.RandomApply([_PILGaussianBlur(p.blur_sigma)], p=p.blur_p),
            T.RandomSolarize(128, p=p.solarize_p),
            T.RandomHorizontalFlip(p=p.flip_p),
        ]
    )


_WHOLE_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)  # (4,) y0, x0, y1, x1


class KeyedView:
    """View `view` (0 or 1) of a sample: the crop window of kernels/views.draw_one keyed by
    (seed, epoch, index, view), the same (y0, x0, h, w) as the DALI and FFCV backends (ContrastiveCrop's
    Beta offsets around the image's box when ``boxes`` is active and aug.crop_alpha > 0), resized to
    size x size bilinearly (RandomResizedCrop's resize; the call's ``size``, else aug.size), then
    colour_transform (torch RNG). The window does not depend on the size."""

    def __init__(self, aug: AugParams, view: int, seed: int, boxes: BoxTable | None = None):
        f64 = lambda *v: np.asarray(v, np.float64)  # noqa: E731
        self.size, self.view, self.seed, self.boxes, self.alpha = aug.size, view, np.uint64(seed), boxes, aug.crop_alpha
        self.args = (f64(*aug.crop_scale), f64(*aug.crop_ratio),
                     f64(aug.jitter_p, aug.gray_p, aug.blur_p, aug.solarize_p, aug.flip_p), f64(*aug.jitter),
                     f64(*aug.blur_sigma))
        self.colour = colour_transform(aug)

    def window(self, W: int, H: int, epoch: int, index: int, box_index: int | None = None) -> tuple[int, int, int, int]:
        """(y0, x0, h, w) px of the crop of a W x H image; box_index: the table row (default index)."""
        box, alpha = _WHOLE_BOX, 0.0
        if self.boxes is not None and self.alpha > 0 and self.boxes.active:
            box, alpha = self.boxes.array[index if box_index is None else box_index], float(self.alpha)
        y0, x0, h, w = draw_one(self.seed, int(epoch), int(self.view), int(index), int(W), int(H), *self.args,
                                box, alpha)[:4]
        return int(y0), int(x0), int(h), int(w)

    def __call__(self, img: Image.Image, epoch: int, index: int, box_index: int | None = None,
                 size: int = 0) -> Image.Image:
        y0, x0, h, w = self.window(img.width, img.height, epoch, index, box_index)
        s = size or self.size
        img = TF.resized_crop(img, y0, x0, h, w, [s, s], InterpolationMode.BILINEAR, antialias=True)
        return self.colour(img)


def eval_transform(size: int, resize: int = 0) -> T.Compose:
    """Resize the shorter side (default size * 8/7, i.e. 256 for 224) and centre-crop."""
    return T.Compose([T.Resize(resize or round(size * 8 / 7)), T.CenterCrop(size)])


def probe_train_transform(size: int) -> T.Compose:
    """Linear-probe training augmentation: RandomResizedCrop (default scale) + flip."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def decode_image(path: str) -> Image.Image:
    """The RGB image at `path` as this backend (and the FFCV writer) decodes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. PIL's "Truncated File Read" / EXIF warnings
        with Image.open(path) as im:
            return im.convert("RGB")  # grayscale, CMYK, palette and RGBA all become RGB


def unreadable_reason(path: str) -> str | None:
    """Why PIL cannot decode `path` (what this backend would skip), or None when it can."""
    try:
        decode_image(path)
        return None
    except _DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"


def find_unreadable(paths, progress: bool = False) -> list[tuple[str, str]]:
    """The files PIL cannot decode, with the reason.  -> [(path, reason)]"""
    from tqdm import tqdm

    reasons = ((p, unreadable_reason(p)) for p in tqdm(paths, desc="check", unit="img", disable=not progress))
    return [(p, why) for p, why in reasons if why is not None]


class _ImageDataset(Dataset):
    """Decodes index[i] once and applies ``views`` (a list of transforms, or of KeyedView with keyed=True)
    to the same decoded image."""

    def __init__(self, index: FolderIndex, views: list, seed: int, keyed: bool = False):
        self.paths, self.labels, self.views, self.seed, self.keyed = index.paths, index.labels, views, seed, keyed

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> tuple[Image.Image, int, list[str], int]:
        bad: list[str] = []
        for attempt in range(min(len(self.paths), 16)):
            j = (i + attempt) % len(self.paths)
            try:
                return decode_image(self.paths[j]), self.labels[j], bad, j
            except _DECODE_ERRORS as e:
                bad.append(f"{self.paths[j]} ({type(e).__name__}: {e})")
        raise DataError(f"{len(bad)} consecutive unreadable images, first: {bad[0]}")

    def __getitem__(self, key: tuple[int, int, int]):
        i, epoch, size = key  # size: the view side of the epoch (0: the KeyedViews' own)
        img, label, bad, j = self._load(i)  # j: the image actually read (i, or the next readable one)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, i))
            views = [torch.from_numpy(np.asarray(t(img, epoch, i, j, size) if self.keyed else t(img), dtype=np.uint8).copy())
                     for t in self.views]
        return (*views, label, i, bad)  # views: (H, W, 3) uint8 each


class _ShardSampler(Sampler):
    """Yields (index, epoch, size) keys of this rank's shard, from batch ``start_batch`` on; with ``indices``
    (m,) the shard of m positions is mapped through them (folder indices of a subset). size: the epoch's
    view side (progressive resolution; 0 = the views' own): the key carries it to the persistent workers,
    so a size change costs nothing."""

    def __init__(self, n, rank, world, batch, seed, shuffle, drop_last, indices: np.ndarray | None = None):
        self.args = dict(n=n, rank=rank, world=world, batch=batch, seed=seed, shuffle=shuffle, drop_last=drop_last)
        self.batch, self.epoch, self.start, self.indices, self.size = batch, 0, 0, indices, 0

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        idx = shard_indices(epoch=self.epoch, **self.args)[self.start * self.batch :]
        if self.indices is not None:
            idx = self.indices[idx]
        return iter([(int(i), self.epoch, self.size) for i in idx])

    def __len__(self) -> int:
        return len(shard_indices(epoch=self.epoch, **self.args)) - self.start * self.batch


def _collate(items):
    *views, labels, idx, bad = zip(*items)
    return (
        *[torch.stack(v) for v in views],  # (N, H, W, 3) uint8 each
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(idx, dtype=torch.long),
        [b for bs in bad for b in bs],
    )


class _Base:
    """DataLoader plumbing and bad-file accounting shared by the train and eval loaders."""

    def __init__(self, dataset, sampler, batch, workers, prefetch, drop_last, device):
        self.device = torch.device(device)
        self.sampler = sampler
        self.bad_files: set[str] = set()
        self.loader = DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            num_workers=workers,
            collate_fn=_collate,
            drop_last=drop_last,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=prefetch if workers > 0 else None,
            persistent_workers=workers > 0,
            # a private generator: iterating never consumes the global torch RNG (exact resume);
            # the samples' own seeds come from (seed, epoch, index)
            generator=torch.Generator().manual_seed(0),
        )

    def _note_bad(self, bad: list[str]) -> None:
        for b in bad:
            if b not in self.bad_files:
                self.bad_files.add(b)
                log.warning("skipped unreadable image %s; %d skipped so far", b, len(self.bad_files))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)


class TorchvisionTrainLoader(_Base):
    """Iterable of Batch for training: two views per image (views=1: view 0 only, x2 None), MixMask
    applied on the device.

    boxes: a ContrastiveCrop BoxTable (mixmask/crops.py) of len(index) rows in shared memory, created
    before this loader (its workers inherit it); None = whole images (plain RandomResizedCrop).
    indices: (m,) positions of ``index`` to draw from (a label subset), None = all; Batch.index holds
    folder positions either way.
    """

    def __init__(
        self,
        index: FolderIndex,
        aug: AugParams,
        stage: MixStage,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 2,
        prefetch: int = 2,
        seed: int = 0,
        device: str | torch.device = "cpu",
        boxes: BoxTable | None = None,
        views: int = 2,
        indices: np.ndarray | None = None,
    ):
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        if boxes is not None and len(boxes) < len(index):
            raise ValueError(f"box table of {len(boxes)} rows for {len(index)} images")
        self.indices = draw_from(indices, len(index), world, batch_size)  # (m,) folder positions
        self.n = len(self.indices)
        self.world, self.batch_size, self.stage, self.boxes, self.aug = world, batch_size, stage, boxes, aug
        self.start_batch = 0
        keyed = [KeyedView(aug, v, seed, boxes) for v in range(views)]
        sampler = _ShardSampler(self.n, rank, world, batch_size, seed, shuffle=True, drop_last=True,
                                indices=None if indices is None else self.indices)
        sampler.size = aug.size_at(0)
        super().__init__(_ImageDataset(index, keyed, seed, keyed=True), sampler, batch_size, workers, prefetch, True,
                         device)

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.world, self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (seeds the order and augmentations; its view side aug.size_at(epoch)) and skip its
        first batches (resume)."""
        self.sampler.epoch, self.sampler.start = epoch, start_batch
        self.sampler.size = self.aug.size_at(epoch)  # travels in the sample keys: no worker restart
        self.start_batch = start_batch  # the step index of the first batch (keys the masks)

    def __iter__(self) -> Iterator[Batch]:
        epoch, step = self.sampler.epoch, self.start_batch
        for *views, labels, idx, bad in self.loader:  # views: one or two (N, S, S, 3) uint8
            self._note_bad(bad)
            v1, v2 = [self._to_device(v) for v in views] if len(views) == 2 else (self._to_device(views[0]), None)
            yield self.stage(v1, v2, self._to_device(labels), idx, epoch, step)
            step += 1


class TorchvisionEvalLoader(_Base):
    """Iterable of (x, labels, index) for kNN banks and linear probes: one view, normalised, on the device.

    The split is sharded with padding (ranks get equal counts); callers drop repeated indices.
    """

    def __init__(
        self,
        index: FolderIndex,
        transform,
        stage: MixStage,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 2,
        seed: int = 0,
        shuffle: bool = False,
        device: str | torch.device = "cpu",
    ):
        self.stage = stage
        sampler = _ShardSampler(len(index), rank, world, batch_size, seed, shuffle=shuffle, drop_last=False)
        super().__init__(_ImageDataset(index, [transform], seed), sampler, batch_size, workers, 2, False, device)
        self.classes = index.classes

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for v, labels, idx, bad in self.loader:
            self._note_bad(bad)
            yield self.stage.normalize(self._to_device(v)), self._to_device(labels), idx
