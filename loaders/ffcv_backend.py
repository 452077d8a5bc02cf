"""The FFCV backend: .beton files, one JPEG decode per image, two MoCo v2 views (or one) in one compiled
op; and an FFCV evaluation loader.

    data.backend=ffcv   (pip install '.[ffcv]': ffcv 1.0.2 builds against libturbojpeg and OpenCV)

Writing (``write_beton``, ``python train.py write-beton``): an ImageFolder split -> <dir>/<split>.beton
with fields image (RGBImageField: raw, jpg or proportion mode, max_resolution, jpeg_quality), label
and index (the file's position in the folder index). Files PIL cannot decode are skipped and
reported, never fatal; the result is read back and checked (count, labels); an existing file is
kept unless overwrite is asked.

Reading (``FfcvTrainLoader``): an FFCV Loader whose image pipeline is one operation,
``TwoViewDecoder``: per sample it decodes the stored image ONCE (FFCV's turbojpeg imdecode, or the
raw pixels), then for each of the two views crops and resizes (FFCV's OpenCV resize_crop), applies
colour jitter + grayscale as one affine map and the Gaussian blur (kernels/color.py), solarize and
flip, all compiled by FFCV's numba pipeline and run in its threads. FFCV-SSL instead decodes the JPEG
once per view. View parameters come from kernels/views.py keyed by (seed, epoch, index, view), index
the sample's folder position (the .beton's index field), the same draws as the DALI and torchvision
backends; the epoch reaches the compiled code through a one-element array the loader updates
(kernels.views.read_cell). views=1 (supervised fine-tuning, augmented linear probes): the decoder
makes view 0 only (the same pixels as view 0 of views=2) and the stage gets v2=None.
ContrastiveCrop (mixmask/crops.py; Peng et al., CVPR 2022): with a box table and aug.crop_alpha > 0
the decoder reads the table's active flag and each image's box (by the sample's folder position)
through their addresses at run time
(kernels.views.read_cell / read_boxes), so the compiled pipeline follows in-place table updates.
The order is this rank's shard of the per-epoch permutation (loaders/sharding.py), so every backend
visits the same samples; ``indices`` (folder positions, a label subset) restricts it to those samples,
mapped to .beton samples through the index field (a position the .beton lacks, e.g. skipped as
unreadable when it was written, is an error). FFCV's QUASI_RANDOM order (one process only) is the
alternative for datasets larger than the page cache (os_cache=False).
The (N, views, S, S, 3) uint8 views are copied out of FFCV's reused buffers before the device stage
(mixmask/mixing/stage.MixStage: normalise, layout, MixMask with our kernels).

Evaluation (``FfcvEvalLoader``, the interface of TorchvisionEvalLoader): <beton_dir>/<split>.beton
read with FFCV's CenterCropRGBImageDecoder at ratio size / resize (the centre square of side
int(min(H, W) * size / resize) resized to size x size: the shorter side resized to ``resize`` then
centre-cropped), this rank's padded shard in order, drop_last=False; callers drop repeats by index.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mixmask.mixing import MixStage
from loaders.folder import DataError, index_split
from loaders.sharding import as_positions, batches_per_epoch, draw_from, shard_indices
from loaders.torchvision_backend import AugParams, decode_image, unreadable_reason
from mixmask.batch import Batch

if TYPE_CHECKING:
    from mixmask.crops import BoxTable

log = logging.getLogger(__name__)

WRITE_MODES = ("raw", "jpg", "proportion")


def require_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise DataError("data.backend=ffcv needs FFCV: apt install libturbojpeg0-dev libopencv-dev pkg-config, "
                        "then pip install '.[ffcv]'") from e


# ---------------------------------------------------------------------------------------------
# Writing

class _FolderImages:
    """An indexable (image, label, index) dataset over the decodable files of a split."""

    def __init__(self, paths, labels, positions, max_resolution: int):
        self.paths, self.labels, self.positions, self.max_res = paths, labels, positions, max_resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        img = decode_image(self.paths[i])
        if self.max_res and max(img.size) > self.max_res:  # the writer would resize too; fewer bytes to pickle
            s = self.max_res / max(img.size)
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
        return np.asarray(img), self.labels[i], self.positions[i]


def write_beton(root: str | Path, split: str, out: str | Path, write_mode: str = "jpg",
                max_resolution: int = 0, jpeg_quality: int = 90, compress_probability: float = 0.5,
                workers: int = 2, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert root/<split> (ImageFolder) to the .beton file `out`. -> facts (samples, skipped, bytes)."""
    require_ffcv()
    from concurrent.futures import ThreadPoolExecutor

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    if write_mode not in WRITE_MODES:
        raise DataError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists (pass overwrite to replace it)")
    index = index_split(root, split)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes release the GIL
        checks = list(tqdm(pool.map(unreadable_reason, index.paths), total=len(index), desc=f"check {split}",
                           unit="img", disable=not progress))
    bad = [(p, why) for p, why in zip(index.paths, checks) if why is not None]
    for p, why in bad:
        log.warning("skipped undecodable image %s (%s)", p, why)
    keep = [k for k, why in enumerate(checks) if why is None]
    if not keep:
        raise DataError(f"no decodable images in {index.root}")
    ds = _FolderImages([index.paths[k] for k in keep], [index.labels[k] for k in keep], keep, max_resolution)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution or None,
                               jpeg_quality=jpeg_quality, compress_probability=compress_probability),
        "label": IntField(),
        "index": IntField(),
    }
    writer = DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
    writer.from_indexed_dataset(ds, chunksize=64, shuffle_indices=False)  # FFCV shows its own bar
    facts = _validate(tmp, ds)
    os.replace(tmp, out)  # atomic: a crash never leaves a half-written .beton under the final name
    facts.update(path=str(out), split=split, skipped=[f"{p} ({why})" for p, why in bad], write_mode=write_mode,
                 seconds=time.perf_counter() - t0, bytes=out.stat().st_size)
    log.info("wrote %s: %d images, %d skipped, %.1f MB", out, facts["samples"], len(bad), facts["bytes"] / 1e6)
    return facts


def _validate(path: Path, ds: _FolderImages) -> dict:
    """Read the labels and indices back: the count and every label must match the folder's."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    if r.num_samples != len(ds):
        raise DataError(f"{path}: {r.num_samples} samples written, {len(ds)} expected")
    labels = np.asarray(r.metadata["f1"]).astype(np.int64)  # field order: image, label, index
    positions = np.asarray(r.metadata["f2"]).astype(np.int64)
    if not (np.array_equal(labels, ds.labels) and np.array_equal(positions, ds.positions)):
        raise DataError(f"{path}: labels or indices read back differ from the folder's")
    return {"samples": int(r.num_samples), "classes": int(labels.max()) + 1}


def ensure_beton(root: Path, split: str, out_dir: Path, **kw) -> Path:
    """<out_dir>/<split>.beton, written on first use (kept afterwards)."""
    out = Path(out_dir) / f"{split}.beton"
    if not out.exists():
        write_beton(root, split, out, **kw)
    return out


# ---------------------------------------------------------------------------------------------
# The two-view decoder

def view_decoder(aug: AugParams, seed: int, epoch_cell: np.ndarray, positions: np.ndarray,
                 views: tuple[int, ...] = (0, 1), boxes: np.ndarray | None = None,
                 active_cell: np.ndarray | None = None, size_cell: np.ndarray | None = None):
    """An FFCV decoder Operation (built lazily: ffcv is optional): decodes each image once and emits
    the given views, (len(views), S, S, 3). views=(0, 1) is the decode-once two-view decoder, (0,) the
    one-view one; two pipelines with views (0,) and (1,) over the same field decode twice (the FFCV-SSL way).

    size_cell (1,) int64: the side s <= S = aug.size of the views, read at run time like the epoch
    (progressive resolution): the buffers are allocated at S and each view (s, s, 3) is written C-contiguous
    into the first s*s*3 bytes of its (S, S, 3) slot (unpack_views reads it back); None: s = S always.

    positions (n_samples,) int64 C-contiguous: sample -> folder position (the index field), which keys
    the views and picks the box row. ContrastiveCrop: boxes (n, 4) float32 C-contiguous (a BoxTable's
    .array) and active_cell (1,) int64 (its active flag). All three are read through their addresses at
    run time: the caller keeps them alive and updates them only in place. boxes None: whole images,
    plain RandomResizedCrop."""
    views_arr = np.asarray(views, np.int64)
    if size_cell is None:
        size_cell = np.full(1, aug.size, np.int64)
    if boxes is None:
        boxes = np.array([[0, 0, 1, 1]], np.float32)  # (1, 4) never read: the flag below stays 0
        active_cell = np.zeros(1, np.int64)
    for name, a, dt in (("boxes", boxes, np.float32), ("active_cell", active_cell, np.int64),
                        ("positions", positions, np.int64), ("size_cell", size_cell, np.int64)):
        if a is None or a.dtype != dt or not a.flags.c_contiguous:
            raise ValueError(f"view_decoder: {name} must be a C-contiguous {np.dtype(dt).name} array")
    keep = (boxes, active_cell, positions, size_cell)  # alive as long as the decoder (read through raw addresses)
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode, memcpy, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    from kernels.color import colour_affine_hwc, colour_map_into, gaussian_blur_hwc
    from kernels.views import draw_one, read_boxes, read_cell, read_int64

    class TwoViewDecoder(SimpleRGBImageDecoder):  # FFCV takes a field's decoder by its class
        arrays = keep

        def declare_state_and_memory(self, previous_state):
            max_w, max_h = np.uint64(self.metadata["width"].max()), np.uint64(self.metadata["height"].max())
            S = aug.size
            out_shape = (len(views_arr), S, S, 3)
            u8 = np.dtype("<u1")
            return (replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
                    (AllocationQuery(out_shape, u8),                                       # the views
                     AllocationQuery((max_h * max_w * np.uint64(3),), u8),                  # decoded image
                     AllocationQuery((S, S, 3), u8),                                        # scratch view
                     AllocationQuery((3, 3), np.dtype("<f4")),                              # colour map
                     AllocationQuery((2,), np.dtype("<f4")),                                # its (c b, (1-c) b)
                     AllocationQuery((1,), np.dtype("<f4"))))                               # blur sigma

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            memcpy_c = Compiler.compile(memcpy)
            colour_c = Compiler.compile(colour_affine_hwc)
            blur_c = Compiler.compile(gaussian_blur_hwc)
            f64 = lambda *v: np.asarray(v, np.float64)  # noqa: E731
            scale, ratio, sig_r = f64(*aug.crop_scale), f64(*aug.crop_ratio), f64(*aug.blur_sigma)
            probs = f64(aug.jitter_p, aug.gray_p, aug.blur_p, aug.solarize_p, aug.flip_p)
            jit_s = f64(*aug.jitter)
            seed_u = np.uint64(seed)
            cell = epoch_cell.ctypes.data  # the loader writes the epoch there before each pass
            box_addr, n_boxes = boxes.ctypes.data, boxes.shape[0]  # the box table, rewritten in place
            active_addr = active_cell.ctypes.data  # 1 once the boxes are in use
            pos_addr, n_pos = positions.ctypes.data, positions.shape[0]
            size_addr = size_cell.ctypes.data  # the loader writes the pass's view side there (<= aug.size)
            alpha = float(aug.crop_alpha)

            def decode(batch_indices, my_storage, metadata, storage_state):
                dest, temp, scratch, cmat, cbuf, sgm = my_storage
                epoch = read_cell(cell)
                on = alpha > 0.0 and read_cell(active_addr) != 0  # ContrastiveCrop, else RandomResizedCrop
                a_now = alpha if on else 0.0
                table = read_boxes(box_addr, n_boxes)  # (n, 4) float32
                pos = read_int64(pos_addr, n_pos)  # (n_samples,) int64
                side = read_cell(size_addr)
                n3 = side * side * 3
                for k in my_range(len(batch_indices)):
                    i = batch_indices[k]
                    key = np.int64(pos[i])  # the folder position keys the draws
                    field = metadata[i]
                    data = mem_read(field["data_ptr"], storage_state)
                    H, W = field["height"], field["width"]
                    if field["mode"] == jpg:
                        img = temp[k][:H * W * 3]
                        imdecode_c(data, img, H, W, H, W, 0, 0, 1, 1, False, False)
                        img = img.reshape(H, W, 3)
                    else:
                        img = data.reshape(H, W, 3)
                    for slot in range(views_arr.shape[0]):
                        y0, x0, h, w, fl, jon, jt, gr, bon, sg, sol = draw_one(
                            seed_u, epoch, views_arr[slot], key, np.int64(W), np.int64(H), scale, ratio,
                            probs, jit_s, sig_r, table[key if on else 0], a_now)
                        out = dest[k, slot].reshape(-1)[:n3].reshape(side, side, 3)  # packed at the slot's start
                        sc = scratch[k].reshape(-1)[:n3].reshape(side, side, 3)
                        resize_crop_c(img, y0, y0 + h, x0, x0 + w, out)
                        if jon or gr:
                            if jon:
                                colour_map_into(jt[2], jt[3], gr, jt[0], jt[1], cmat[k], cbuf[k])
                            else:
                                colour_map_into(1.0, 0.0, gr, 1.0, 1.0, cmat[k], cbuf[k])
                            colour_c(sc, out, cmat[k], cbuf[k])
                            memcpy_c(sc, out)
                        if bon:
                            sgm[k, 0] = sg
                            blur_c(sc, out, sgm[k])
                            memcpy_c(sc, out)
                        if sol:
                            for y in range(out.shape[0]):
                                for x in range(out.shape[1]):
                                    for c in range(3):
                                        if out[y, x, c] >= 128:
                                            out[y, x, c] = 255 - out[y, x, c]
                        if fl:
                            Sx = out.shape[1]
                            for y in range(out.shape[0]):
                                for x in range(Sx // 2):
                                    for c in range(3):
                                        t = out[y, x, c]
                                        out[y, x, c] = out[y, Sx - 1 - x, c]
                                        out[y, Sx - 1 - x, c] = t
                return dest[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return TwoViewDecoder()


def _traversal(sample_order: Callable[[np.ndarray, int], np.ndarray]):
    """A TraversalOrder whose order of an epoch is sample_order(loader.indices, epoch) (.beton sample ids).
    ffcv 1.0.2 calls a TraversalOrder *instance* with the loader, so the instance returns itself."""
    from ffcv.traversal_order.base import TraversalOrder

    class Order(TraversalOrder):
        def __init__(self):  # noqa: D401 - set up by __call__
            pass

        def __call__(self, loader):
            self.loader, self.indices = loader, loader.indices
            return self

        def sample_order(self, epoch: int):
            return sample_order(self.indices, epoch)

    return Order()


def _positions(reader) -> np.ndarray:
    """The index field: each .beton sample's folder position.  -> (n_samples,) int64 C-contiguous"""
    return np.ascontiguousarray(np.asarray(reader.metadata["f2"]), np.int64)


def beton_ids(positions: np.ndarray, wanted, beton: str) -> np.ndarray:
    """The .beton samples holding the folder positions `wanted` (positions: the index field).  -> (m,) int64
    DataError naming the positions the .beton lacks (skipped as unreadable when it was written)."""
    wanted = as_positions(wanted)
    lookup = np.full(int(positions.max(initial=-1)) + 1, -1, np.int64)  # folder position -> sample, or -1
    lookup[positions] = np.arange(len(positions))
    inside = (wanted >= 0) & (wanted < len(lookup))
    ids = np.full(len(wanted), -1, np.int64)
    ids[inside] = lookup[wanted[inside]]
    missing = wanted[ids < 0]
    if len(missing):
        raise DataError(f"{beton} has no sample at folder positions {missing[:8].tolist()}"
                        f"{' ...' if len(missing) > 8 else ''} ({len(missing)} of {len(wanted)} asked for): "
                        "skipped as unreadable when it was written, or another split")
    return ids


class FfcvTrainLoader:
    """Iterable of Batch for training (same interface as TorchvisionTrainLoader and DaliTrainLoader).

    boxes: a ContrastiveCrop BoxTable (mixmask/crops.py) with a row per image of the split's folder
    index (the .beton's index field), None = whole images; the compiled decoder reads it at run time.
    views: 2, or 1 (view 0 only, x2 None). indices: (m,) folder positions to draw from (a label subset),
    None = every sample of the .beton; Batch.index holds folder positions either way.
    """

    def __init__(self, beton: str | Path, aug: AugParams, stage: MixStage, batch_size: int, rank: int = 0,
                 world: int = 1, workers: int = 2, seed: int = 0, device: str | torch.device = "cpu",
                 os_cache: bool = True, order: str = "random", batches_ahead: int = 3, decode_once: bool = True,
                 boxes: BoxTable | None = None, views: int = 2, indices: np.ndarray | None = None):
        require_ffcv()
        from ffcv.reader import Reader

        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        if order not in ("random", "quasi_random"):
            raise DataError(f"ffcv order must be 'random' or 'quasi_random', got {order!r}")
        if order == "quasi_random" and world > 1:
            raise DataError("ffcv's quasi_random order does not shard across processes; use order=random")
        self.beton, self.aug, self.stage, self.batch_size = str(beton), aug, stage, batch_size
        self.rank, self.world, self.workers, self.seed = rank, world, workers, seed
        self.device, self.os_cache, self.order, self.batches_ahead = torch.device(device), os_cache, order, batches_ahead
        self.decode_once, self.views = decode_once, views  # decode_once False: one decode per view (FFCV-SSL)
        self.positions = _positions(Reader(self.beton))  # (n_samples,) sample -> folder position
        ids = None if indices is None else beton_ids(self.positions, indices, self.beton)
        self.ids = draw_from(ids, len(self.positions), world, batch_size)  # (m,) the .beton samples drawn from
        self.n = len(self.ids)
        self.boxes = boxes
        self._box_args = {}
        if boxes is not None:
            if len(self.positions) and self.positions.max() >= len(boxes):
                raise ValueError(f"box table of {len(boxes)} rows for folder indices up to {self.positions.max()}")
            self._box_args = dict(boxes=boxes.array, active_cell=boxes.active_cell)
        self.epoch_cell = np.zeros(1, np.int64)  # read by the compiled decoder (kernels.views.read_cell)
        # the epoch's view side (progressive resolution, aug.size_at), read the same way: the buffers are
        # allocated at aug.size (the largest side), so a size change costs neither a rebuild nor a compilation
        self.size_cell = np.full(1, aug.size_at(0), np.int64)
        self.epoch, self.start_batch = 0, 0
        self.bad_files: set[str] = set()  # bad files were dropped when the .beton was written
        self._loader, self._skip = None, -1
        _install_thread_hook()
        _install_unraisable_filter()

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.world, self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def close(self) -> None:
        self._loader = None

    def _make(self, skip: int):
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline.pipeline_spec import PipelineSpec

        r, w, b, seed = self.rank, self.world, self.batch_size, self.seed
        order = (OrderOption.QUASI_RANDOM if self.order == "quasi_random" else _traversal(
            lambda ids, epoch: ids[shard_indices(len(ids), r, w, b, seed=seed, epoch=epoch, shuffle=True,
                                                 drop_last=True)[skip * b:]]))
        decoder = lambda views: view_decoder(self.aug, seed, self.epoch_cell, self.positions, views,  # noqa: E731
                                             size_cell=self.size_cell, **self._box_args)
        if self.decode_once or self.views == 1:
            pipelines = {"image": [decoder(tuple(range(self.views)))]}
        else:  # two pipelines over the same field: FFCV decodes the JPEG once per pipeline
            pipelines = {"image": [decoder((0,))], "image2": PipelineSpec("image", decoder=decoder((1,)))}
        pipelines.update(label=[IntDecoder()], index=[IntDecoder()])
        return Loader(self.beton, batch_size=b, num_workers=max(1, self.workers), os_cache=self.os_cache,
                      order=order, seed=seed, pipelines=pipelines, drop_last=True, batches_ahead=self.batches_ahead,
                      indices=self.ids.astype(np.uint64))  # FFCV's own index dtype

    def __iter__(self) -> Iterator[Batch]:
        epoch, step = self.epoch, self.start_batch
        skip = step if self.order == "random" else 0
        fresh = self._loader is None or skip != self._skip
        if fresh:
            self._loader, self._skip = self._make(skip), skip
            log.info("ffcv: compiling the view pipeline (during the first batch)")
        self._loader.next_epoch = epoch
        self.epoch_cell[0] = epoch
        self.size_cell[0] = side = self.aug.size_at(epoch)
        t0 = time.perf_counter()
        with closing(_batches(self._loader, lambda: f"epoch {epoch} near batch {step} ({self.beton})")) as batches:
            for out in batches:
                if fresh:
                    log.info("ffcv: first batch after %.1f s (pipeline compilation included)", time.perf_counter() - t0)
                    fresh = False
                # (N, views, S, S, 3) in FFCV's reused buffer -> owned (N, S, S, 3) copies on the device
                views = unpack_views(out["image"], side)  # (N, 2, s, s, 3); (N, 1, s, s, 3) with views=1 or beside image2
                second = None if self.views == 1 else views[:, 1] if self.decode_once else unpack_views(out["image2"], side)[:, 0]
                x1 = _owned(views[:, 0], self.device)
                x2 = None if second is None else _owned(second, self.device)
                lab = torch.from_numpy(out["label"].reshape(-1).astype(np.int64)).to(self.device)
                yield self.stage(x1, x2, lab, torch.from_numpy(out["index"].reshape(-1).astype(np.int64)), epoch, step)
                step += 1


def unpack_views(a: np.ndarray, side: int) -> np.ndarray:
    """The decoder's (N, V, S, S, 3) buffer -> its (N, V, side, side, 3) views (each packed C-contiguous at the
    start of its slot, view_decoder), a strided view of the buffer; side == S: the buffer itself."""
    n, v, S = a.shape[0], a.shape[1], a.shape[2]
    if side == S:
        return a
    return a.reshape(n, v, S * S * 3)[:, :, :side * side * 3].reshape(n, v, side, side, 3)


def _owned(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A view into FFCV's reused buffer -> a contiguous copy the loader owns, on `device`."""
    return torch.from_numpy(a).to(device, copy=True).contiguous()


def _batches(loader, where: Callable[[], str]) -> Iterator[dict[str, np.ndarray]]:
    """One pass of an FFCV Loader: each batch's outputs by pipeline name (views into FFCV's reused
    buffers). A pipeline thread that dies raises DataError here (FFCV would wait forever); where()
    names the position for the message."""
    it = iter(loader)  # FFCV's EpochIterator: a thread filling a queue
    try:
        while True:
            try:
                item = it.output_queue.get(timeout=0.5)
            except queue.Empty:
                if not it.is_alive():  # the thread died
                    err = _THREAD_ERRORS.pop(id(it), None)
                    raise DataError(f"FFCV pipeline failed in {where()}: "
                                    f"{type(err).__name__ if err else 'thread ended'}: {err}") from err
                continue
            if item is None:
                break
            slot, out = item
            if it.loader is not None and torch.cuda.is_available():
                it.current_stream.wait_stream(it.cuda_streams[slot])
            yield dict(zip(loader.pipeline_specs, out))
    finally:
        it.close()


class FfcvEvalLoader:
    """Iterable of (x, labels, index) for kNN banks and linear probes (the interface of
    TorchvisionEvalLoader): x (n, 3, S, S) = stage.normalize of the centre crop, labels (n,) int64 on the
    device, index (n,) int64 folder positions (the index field) on the host. This rank's padded shard of
    the .beton in order (callers drop repeated indices). resize: the shorter side the centre crop is
    taken from (0: round(size * 8/7), as eval_transform); classes: the split's class names (None: "0".."k-1"
    up to the largest label)."""

    def __init__(self, beton: str | Path, size: int, resize: int, stage: MixStage, batch_size: int, rank: int = 0,
                 world: int = 1, workers: int = 2, device: str | torch.device = "cpu",
                 classes: tuple[str, ...] | None = None, os_cache: bool = True, batches_ahead: int = 2):
        require_ffcv()
        from ffcv.reader import Reader

        reader = Reader(str(beton))
        self.beton, self.size, self.resize = str(beton), size, resize or round(size * 8 / 7)
        self.stage, self.batch_size, self.device = stage, batch_size, torch.device(device)
        self.rank, self.world, self.workers = rank, world, workers
        self.os_cache, self.batches_ahead = os_cache, batches_ahead
        labels = np.asarray(reader.metadata["f1"]).astype(np.int64)
        self.classes = tuple(classes) if classes is not None else tuple(str(c) for c in range(labels.max() + 1))
        self.n = int(reader.num_samples)
        self.epoch = 0
        self.bad_files: set[str] = set()  # bad files were dropped when the .beton was written
        self._loader = None
        _install_thread_hook()
        _install_unraisable_filter()

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world)  # padded shard
        return -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the order does not depend on it

    def close(self) -> None:
        self._loader = None

    def _make(self):
        from ffcv.fields.decoders import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader

        r, w, b = self.rank, self.world, self.batch_size
        order = _traversal(lambda ids, epoch: ids[shard_indices(len(ids), r, w, b, seed=0, epoch=0, shuffle=False,
                                                                 drop_last=False)])
        pipelines = {"image": [CenterCropRGBImageDecoder((self.size, self.size), ratio=self.size / self.resize)],
                     "label": [IntDecoder()], "index": [IntDecoder()]}
        return Loader(self.beton, batch_size=b, num_workers=max(1, self.workers), os_cache=self.os_cache,
                      order=order, pipelines=pipelines, drop_last=False, batches_ahead=self.batches_ahead)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            self._loader = self._make()
        step = 0
        with closing(_batches(self._loader, lambda: f"evaluation batch {step} ({self.beton})")) as batches:
            for out in batches:
                v = _owned(out["image"], self.device)  # (n, S, S, 3) uint8
                labels = torch.from_numpy(out["label"].reshape(-1).astype(np.int64)).to(self.device)
                yield self.stage.normalize(v), labels, torch.from_numpy(out["index"].reshape(-1).astype(np.int64))
                step += 1


_THREAD_ERRORS: dict[int, BaseException] = {}


def _install_thread_hook() -> None:
    """Keep the exception that ends one of FFCV's EpochIterator threads (it would only be printed,
    and the consumer would wait forever) so that the loader can raise it in the main thread."""
    previous = threading.excepthook
    if getattr(previous, "_mixmask", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "EpochIterator":
            _THREAD_ERRORS[id(args.thread)] = args.exc_value
            return
        previous(args)

    hook._mixmask = True
    threading.excepthook = hook


def _install_unraisable_filter() -> None:
    """Drop one known-harmless message: numba's dispatcher finalizer raises KeyError at garbage collection
    for the functions FFCV compiles per pipeline (printed as 'Exception ignored in: <finalize ...>' with a
    traceback, after the loader is gone). Every other unraisable exception still goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_mixmask", False):
        return

    def hook(u):
        tb = u.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (isinstance(u.exc_value, KeyError) and tb is not None and tb.tb_frame.f_code.co_name == "finalizer"
                and tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("numba/core/dispatcher.py")):
            return
        previous(u)

    hook._mixmask = True
    sys.unraisablehook = hook
