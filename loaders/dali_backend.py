"""The NVIDIA DALI backend: decode once, two MoCo v2 views (or one) in a DALI pipeline, MixMask after it;
and a DALI evaluation loader.

    data.backend=dali   (pip install '.[dali]': nvidia-dali-cuda130)

Per batch of this rank's shard (loaders/sharding.py: the same order as every backend):
- The feeder (Python, in the pipeline's external_source) reads each file's bytes and its size from
  the image header, and draws both views' parameters from the Philox stream keyed by
  (seed, epoch, index, view) (loaders/view_params.py over kernels/views.py, ~1 us a sample), so
  views are reproducible for any thread count and resume exactly. With an active ContrastiveCrop
  box table (mixmask/crops.py; Peng et al., CVPR 2022) and aug.crop_alpha > 0 it passes each image's
  box of the current table, and the crop offsets are Beta(alpha, alpha) around it.
- The pipeline decodes each image once (CPU decoder with device_id=None; on a GPU the "mixed"
  nvJPEG decoder with a configurable hardware-decoder share), then per view: resize of the crop
  window to size x size (antialiased), colour jitter + grayscale as one affine colour map
  (kernels/color.py, our Numba kernel run by DALI's numba operator: 7x cheaper than DALI's own
  colour ops on the CPU), Gaussian blur, solarize and flip, each applied per sample by DALI
  conditionals.
- The two uint8 NHWC views are copied out of DALI's buffers into tensors the loader owns (the trainer
  never sees memory DALI will reuse), then mixmask/mixing/stage.MixStage normalises, lays out and
  mixes them with our Numba kernels (CUDA on the same stream on a GPU, parallel CPU otherwise).
- views=1 (supervised fine-tuning, augmented linear probes): the feeder draws and the pipeline makes
  view 0 only (the same pixels as view 0 of views=2), and the stage gets v2=None. ``indices``: train
  on those positions of the split only (a label subset, loaders/sharding.draw_from); Batch.index
  holds folder positions either way.

Evaluation (``DaliEvalLoader``, the interface of TorchvisionEvalLoader): this rank's padded shard of
the split in order, each image decoded once, its shorter side resized to ``resize`` (antialiased
linear) and centre-cropped to size x size; the last batch is padded to the pipeline's batch size by
repeating a sample and cut back before it is yielded; callers drop the ranks' repeats by index.

Bad input (both loaders): a file whose header cannot be read is replaced at once by the next
readable image (the batch keeps its size, as in the torchvision backend); a file the decoder rejects
makes the pipeline raise: the loader then finds the culprits among the batches in flight (bisecting
with a one-file probe pipeline), adds them to ``bad_files``, rebuilds the pipeline and feeds the same
batch again. An evaluation batch reports the index of the image actually read, so a skipped file is
missing from the features rather than standing in for its neighbour.
``find_undecodable(paths)`` (``train.py check``) lists every file DALI cannot decode.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from mixmask.mixing import MixStage
from loaders.folder import DataError, FolderIndex
from loaders.sharding import batches_per_epoch, draw_from, shard_indices
from loaders.torchvision_backend import AugParams
from loaders.view_params import draw_views
from mixmask.batch import Batch

if TYPE_CHECKING:
    from mixmask.crops import BoxTable

log = logging.getLogger(__name__)


def require_dali():
    try:
        import nvidia.dali as dali
    except ImportError as e:
        raise DataError(
            "data.backend=dali needs NVIDIA DALI: pip install '.[dali]' (nvidia-dali-cuda130)"
        ) from e
    return dali


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG start-of-frame markers


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, without decoding: JPEG start-of-frame and PNG IHDR
    parsed directly (~2 us), any other format through PIL's lazy open. Raises on a malformed header."""
    if data[:2] == b"\xff\xd8":
        i, n = 2, len(data)
        while i + 9 <= n:
            if data[i] != 0xFF:
                raise ValueError(f"JPEG: no marker at byte {i}")
            m = data[i + 1]
            if m == 0xFF:  # fill byte
                i += 1
            elif m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
                i += 2
            elif m in _SOF:
                h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
                if w < 1 or h < 1:
                    raise ValueError(f"JPEG: empty frame {w}x{h}")
                return w, h
            else:
                i += 2 + ((data[i + 2] << 8) | data[i + 3])
        raise ValueError("JPEG: no start-of-frame marker")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image {w}x{h}")
    return w, h


# ---------------------------------------------------------------------------------------------
# Pipelines

# per-view parameter inputs of the pipeline (loaders/view_params.ViewBatch fields), by decoder device
_VIEW_INPUTS = ("roi", "flip", "colour_on", "colour_m", "colour_cb", "blur_on", "sigma", "solarize")
_GPU_VIEW_INPUTS = ("roi", "flip", "jitter_on", "jitter", "gray", "blur_on", "sigma", "solarize")

_OPS: dict = {}


def _numba_op(name: str):
    """DALI's numba operator over one of our per-sample kernels (kernels/color.py), built once per
    process: each instance compiles its C callbacks (~1 s) and is reused by every later pipeline."""
    if name not in _OPS:
        from nvidia.dali import types
        from nvidia.dali.plugin.numba.experimental import NumbaFunction

        from kernels import color

        run_fn, in_types, ins_ndim = {
            "colour": (color.colour_affine_hwc, [types.UINT8, types.FLOAT, types.FLOAT], [3, 2, 1]),
            "blur": (color.gaussian_blur_hwc, [types.UINT8, types.FLOAT], [3, 1]),
        }[name]
        _OPS[name] = NumbaFunction(run_fn=run_fn, setup_fn=_same_shape, in_types=in_types, out_types=[types.UINT8],
                                   ins_ndim=ins_ndim, outs_ndim=[3], batch_processing=False, device="cpu")
    return _OPS[name]


def _same_shape(outs, ins):
    # DALI numba operator: the output of each sample has its input image's shape
    for s in range(len(outs[0])):
        outs[0][s][:] = ins[0][s]


def _view(images, p, size, gpu: bool):
    """One MoCo v2 view of the decoded images, from per-sample parameter inputs p (DataNodes); size: a per-sample
    (2,) float32 input (the epoch's side twice), so the side may change between batches without a rebuild."""
    from nvidia.dali import fn, types

    v = fn.resize(images, size=size, roi_start=p["roi"][0:2], roi_end=p["roi"][2:4],
                  roi_relative=True, antialias=True, interp_type=types.INTERP_LINEAR)
    if gpu:  # DALI's own colour and blur operators (its numba GPU operator rejects CUDA 13)
        if p["jitter_on"] == 1:
            j = p["jitter"]
            v = fn.color_twist(v, brightness=j[0], contrast=j[1], saturation=j[2], hue=j[3])
        if p["gray"] == 1:
            v = fn.color_twist(v, saturation=0.0)
        if p["blur_on"] == 1:
            v = fn.gaussian_blur(v, sigma=p["sigma"])
    else:  # our Numba kernels in DALI's threads: 5-7x cheaper than DALI's CPU colour and blur ops
        if p["colour_on"] == 1:  # jitter + grayscale as one affine colour map
            v = fn.reshape(_numba_op("colour")(v, p["colour_m"], p["colour_cb"]), layout="HWC")
        if p["blur_on"] == 1:
            v = fn.reshape(_numba_op("blur")(v, p["sigma"]), layout="HWC")
    if p["solarize"] == 1:
        v = fn.cast(v ^ ((v >= 128) * 255), dtype=types.UINT8)  # 255 - v where v >= 128
    return fn.flip(v, horizontal=p["flip"])


def _decode(data, device_id, hw_decoder_load: float):
    """Each image's bytes -> RGB HWC uint8 (CPU decoder with device_id None, else the "mixed" nvJPEG one)."""
    from nvidia.dali import fn, types

    decoder = {} if device_id is None else {"hw_decoder_load": hw_decoder_load}
    return fn.decoders.image(data, device="cpu" if device_id is None else "mixed", output_type=types.RGB,
                             adjust_orientation=False, **decoder)


def _train_pipeline(source, batch_size: int, threads: int, device_id, seed: int,
                    prefetch: int, hw_decoder_load: float, views: int = 2):
    """Decode once, then `views` MoCo v2 views from the feeder's inputs: bytes, the view side, per-view parameters."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(enable_conditionals=True)
    def pipe():
        names = _VIEW_INPUTS if device_id is None else _GPU_VIEW_INPUTS
        outs = fn.external_source(source=source, num_outputs=2 + views * len(names), batch=True)
        images = _decode(outs[0], device_id, hw_decoder_load)
        return tuple(_view(images, dict(zip(names, outs[2 + v * len(names): 2 + (v + 1) * len(names)])), outs[1],
                           gpu=device_id is not None) for v in range(views))

    return pipe(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                prefetch_queue_depth=prefetch, exec_dynamic=True)


def _eval_pipeline(source, size: int, resize: int, batch_size: int, threads: int, device_id, prefetch: int,
                   hw_decoder_load: float):
    """Decode once, resize the shorter side to `resize` (antialiased linear), centre-crop size x size."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        images = _decode(fn.external_source(source=source, batch=True), device_id, hw_decoder_load)
        images = fn.resize(images, resize_shorter=resize, antialias=True, interp_type=types.INTERP_LINEAR)
        return fn.crop(images, crop=(size, size))  # crop_pos 0.5: centred

    return pipe(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=0,
                prefetch_queue_depth=prefetch, exec_dynamic=True)


def find_undecodable(paths: Sequence[str], threads: int = 2, batch: int = 64,
                     progress: bool = False) -> list[tuple[str, str]]:
    """The files the DALI CPU decoder (or the header reader) rejects, with the reason.

    Decodes in batches of `batch`; a failing batch is split in halves until the culprits are single
    files. -> [(path, reason)]
    """
    require_dali()
    from nvidia.dali import fn, pipeline_def, types

    bad: list[tuple[str, str]] = []
    readable: list[tuple[str, np.ndarray]] = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                data = f.read()
            header_size(data)
            readable.append((p, np.frombuffer(data, np.uint8)))
        except Exception as e:  # noqa: BLE001 - any failure means "cannot be used"
            bad.append((p, f"{type(e).__name__}: {e}"))

    queue: list[list[tuple[str, np.ndarray]]] = [readable[i:i + batch] for i in range(0, len(readable), batch)]
    pipes: dict[int, object] = {}  # batch size -> probe pipeline

    @pipeline_def
    def probe():
        data = fn.external_source(name="data", batch=True)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB, adjust_orientation=False)

    def run(items) -> str | None:
        n = len(items)
        pipe = pipes.get(n)
        if pipe is None:
            pipe = pipes[n] = probe(batch_size=n, num_threads=threads, device_id=None, prefetch_queue_depth=1,
                                    exec_pipelined=False, exec_async=False)
            pipe.build()
        try:
            pipe.feed_input("data", [d for _, d in items])
            pipe.run()
            return None
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses
            pipes.pop(n, None)  # a pipeline that raised is not reused
            return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__

    from tqdm import tqdm

    bar = tqdm(total=len(readable), desc="check", unit="img", disable=not progress)
    while queue:
        items = queue.pop()
        err = run(items)
        if err is None:
            bar.update(len(items))
        elif len(items) == 1:
            bad.append((items[0][0], err))
            bar.update(1)
        else:
            half = len(items) // 2
            queue += [items[:half], items[half:]]
    bar.close()
    return sorted(bad)


# ---------------------------------------------------------------------------------------------
# The loaders

def _read(paths: Sequence[str], i: int, bad: dict[str, str]) -> tuple[int, np.ndarray, tuple[int, int]]:
    """The bytes and (W, H) of paths[i], or of the next readable file: a file or header that cannot be
    read is recorded in `bad` (path -> reason) and skipped.  -> (j, (B,) uint8, (W, H)) of the file read"""
    n = len(paths)
    for attempt in range(min(n, 16)):
        j = (i + attempt) % n
        path = paths[j]
        if path in bad:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
            return j, np.frombuffer(data, np.uint8), header_size(data)
        except Exception as e:  # noqa: BLE001 - unreadable file or header: skip it
            bad[path] = f"{type(e).__name__}: {e}"
            log.warning("skipped unreadable image %s (%s); %d skipped so far", path, bad[path], len(bad))
    raise DataError(f"{min(n, 16)} consecutive unreadable images from {paths[i]}")


class _Feeder:
    """The training pipeline's external source: this rank's batches, in order, epoch after epoch.

    Each call returns the next batch [bytes, view side, view-0 parameters..., (view-1 parameters...)] and
    appends (epoch, batch, paths, labels, indices) to ``pending``; after an epoch's last batch it goes on
    with the next epoch, so the pipeline prefetches across epoch boundaries and is built once per run.
    The view side is aug.size_at(epoch) of the batch's own epoch (progressive resolution), a per-sample
    input of the resize: a size change costs no rebuild and keeps the prefetched batches valid.
    indices: (m,) the folder positions drawn from (loaders/sharding.draw_from).
    """

    def __init__(self, index: FolderIndex, aug: AugParams, batch: int, rank: int, world: int, seed: int,
                 bad: dict[str, str], inputs: tuple[str, ...] = _VIEW_INPUTS, boxes: BoxTable | None = None,
                 views: int = 2, indices: np.ndarray | None = None):
        self.paths, self.labels = index.paths, index.labels
        self.indices = np.arange(len(index), dtype=np.int64) if indices is None else indices
        self.boxes = boxes  # ContrastiveCrop boxes, read at each batch (None: whole images)
        self.aug, self.batch, self.rank, self.world, self.seed, self.views = aug, batch, rank, world, seed, views
        self.bad = bad  # path -> reason (shared with the loader)
        self.inputs = inputs  # the pipeline's per-view parameter inputs
        self.per_epoch = batches_per_epoch(len(self.indices), world, batch)
        self.epoch, self.pos, self.order = 0, 0, None
        self.pending: deque[tuple[int, int, list[str], np.ndarray, np.ndarray]] = deque()

    def start(self, epoch: int, batch_index: int) -> None:
        self.epoch, self.pos, self.order = epoch, batch_index, None
        self.pending.clear()

    def next_key(self) -> tuple[int, int]:
        """(epoch, batch) of the next batch the loader will receive."""
        if self.pending:
            return self.pending[0][0], self.pending[0][1]
        return (self.epoch + 1, 0) if self.pos >= self.per_epoch else (self.epoch, self.pos)

    def __call__(self):
        if self.pos >= self.per_epoch:
            self.epoch, self.pos, self.order = self.epoch + 1, 0, None
        if self.order is None:
            self.order = self.indices[shard_indices(len(self.indices), self.rank, self.world, self.batch,
                                                    seed=self.seed, epoch=self.epoch, shuffle=True, drop_last=True)]
        idx = self.order[self.pos * self.batch:(self.pos + 1) * self.batch]
        key = (self.epoch, self.pos)
        self.pos += 1
        read_idx, data, sizes = (list(t) for t in zip(*(_read(self.paths, int(i), self.bad) for i in idx)))
        paths, labels = [self.paths[j] for j in read_idx], [self.labels[j] for j in read_idx]
        boxes, alpha = None, 0.0  # plain RandomResizedCrop until the box table is active
        if self.boxes is not None and self.aug.crop_alpha > 0 and self.boxes.active:
            boxes, alpha = self.boxes.array[read_idx], self.aug.crop_alpha  # (N, 4): the boxes of the images read
        side = np.full(2, self.aug.size_at(self.epoch), np.float32)  # (2,) the resize's per-sample size input
        out = [data, [side] * len(idx)]
        for view in range(self.views):
            vb = draw_views(self.aug, self.seed, self.epoch, idx, sizes, view, colour="colour_m" in self.inputs,
                            boxes=boxes, alpha=alpha)
            for name in self.inputs:
                col = getattr(vb, name)
                out.append(list(col[:, None] if name == "sigma" else col))  # sigma: (1,) a sample
        self.pending.append((*key, paths, np.asarray(labels, np.int64), np.asarray(idx, np.int64)))
        return out


class _EvalFeeder:
    """The evaluation pipeline's external source: this rank's padded shard of the split (in order,
    loaders/sharding.py) in batches, pass after pass (every pass is the same, so the pipeline
    prefetches into the next one). A short last batch is padded to the pipeline's batch size by
    repeating its first image. Appends (batch, count, paths, labels, indices) to ``pending``: count
    real samples, the paths, labels and folder indices of the images read."""

    def __init__(self, index: FolderIndex, batch: int, rank: int, world: int, bad: dict[str, str]):
        self.paths, self.labels, self.batch, self.bad = index.paths, index.labels, batch, bad
        self.order = shard_indices(len(index), rank, world, batch, seed=0, epoch=0, shuffle=False, drop_last=False)
        self.per_pass = -(-len(self.order) // batch)
        self.pos = 0
        self.pending: deque[tuple[int, int, list[str], np.ndarray, np.ndarray]] = deque()

    def start(self, batch_index: int) -> None:
        self.pos = batch_index
        self.pending.clear()

    def next_key(self) -> int:
        """The batch of the pass the loader will receive next."""
        return self.pending[0][0] if self.pending else self.pos % self.per_pass

    def __call__(self):
        b = self.pos % self.per_pass
        self.pos = b + 1
        read = [_read(self.paths, int(i), self.bad) for i in self.order[b * self.batch:(b + 1) * self.batch]]
        js, data = [j for j, _, _ in read], [d for _, d, _ in read]
        labels = np.asarray([self.labels[j] for j in js], np.int64)
        self.pending.append((b, len(js), [self.paths[j] for j in js], labels, np.asarray(js, np.int64)))
        return data + data[:1] * (self.batch - len(data))  # the pipeline's batch size is fixed


class _DaliLoader:
    """What the train and eval loaders share: the device, the skipped files, copies out of DALI's
    buffers, and recovery from files the decoder rejects (``_build(batch)`` restarts the pipeline)."""

    def __init__(self, device: str | torch.device, threads: int, prefetch: int, hw_decoder_load: float):
        require_dali()
        self.device = torch.device(device)
        self.threads, self.prefetch, self.hw_decoder_load = threads, prefetch, hw_decoder_load
        self._bad: dict[str, str] = {}
        self.epoch, self.pipe = 0, None

    @property
    def bad_files(self) -> set[str]:
        return {f"{p} ({why})" for p, why in self._bad.items()}

    def close(self) -> None:
        """Free the pipeline (its threads and buffers) now rather than at interpreter exit."""
        self.pipe = None

    def _device_id(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _build(self, batch_index: int) -> None:  # pragma: no cover - each loader defines it
        raise NotImplementedError

    def _recover(self, step: int, error: Exception, tries: int) -> None:
        """The pipeline raised on batch `step`: find the undecodable files among the batches in
        flight, mark them bad and rebuild from `step`. Re-raises when no file is to blame."""
        in_flight = [p for item in self.feeder.pending for p in item[2]]  # both feeders keep the paths at [2]
        found = find_undecodable(sorted(set(in_flight)), threads=self.threads)
        for path, why in found:
            self._bad[path] = why
            log.warning("skipped undecodable image %s (%s); %d skipped so far", path, why, len(self._bad))
        if not found or tries > 8:
            raise DataError(f"DALI pipeline failed on batch {step} of epoch {self.epoch}: {error}") from error
        self._build(step)

    def _owned(self, tl) -> torch.Tensor:
        """A DALI TensorList (N, S, S, 3) uint8 -> a tensor the loader owns, on the training device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(tuple(t.shape()), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(t, out, cuda_stream=stream)
        return out


class DaliTrainLoader(_DaliLoader):
    """Iterable of Batch for training (same interface as TorchvisionTrainLoader).

    boxes: a ContrastiveCrop BoxTable (mixmask/crops.py) of len(index) rows, None = whole images. The
    feeder reads it at each batch; as the pipeline prefetches across epochs, a pass that starts after
    the table changed (its ``version``) rebuilds the pipeline, so no batch uses stale boxes.
    views: 2, or 1 (view 0 only, x2 None). indices: (m,) positions of ``index`` to draw from (a label
    subset), None = all; Batch.index holds folder positions either way.
    """

    def __init__(
        self,
        index: FolderIndex,
        aug: AugParams,
        stage: MixStage,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        threads: int = 2,
        prefetch: int = 2,
        seed: int = 0,
        device: str | torch.device = "cpu",
        hw_decoder_load: float = 0.65,
        boxes: BoxTable | None = None,
        views: int = 2,
        indices: np.ndarray | None = None,
    ):
        super().__init__(device, threads, prefetch, hw_decoder_load)
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        if boxes is not None and len(boxes) < len(index):
            raise ValueError(f"box table of {len(boxes)} rows for {len(index)} images")
        self.boxes, self.views = boxes, views
        self.indices = draw_from(indices, len(index), world, batch_size)  # (m,) folder positions
        self.n, self.world, self.batch_size, self.stage = len(self.indices), world, batch_size, stage
        self.aug, self.seed = aug, seed
        inputs = _GPU_VIEW_INPUTS if self.device.type == "cuda" else _VIEW_INPUTS
        self.feeder = _Feeder(index, aug, batch_size, rank, world, seed, self._bad, inputs, boxes, views, self.indices)
        self.start_batch = 0
        self._box_version = None  # the box table's version when the pipeline was built

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.world, self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (seeds the order and views) and skip its first batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _build(self, batch_index: int) -> None:
        """A fresh pipeline whose first batch is `batch_index` of self.epoch."""
        self.pipe = None
        self.feeder.start(self.epoch, batch_index)
        self._box_version = self._boxes_version()
        self.pipe = _train_pipeline(self.feeder, self.batch_size, self.threads, self._device_id(),
                                    self.seed, self.prefetch, self.hw_decoder_load, self.views)
        self.pipe.build()

    def _boxes_version(self):
        """The box table's version when it matters to the views (ContrastiveCrop on), else None."""
        return self.boxes.version if self.boxes is not None and self.aug.crop_alpha > 0 else None

    def __iter__(self) -> Iterator[Batch]:
        epoch, step = self.epoch, self.start_batch
        if self.pipe is None or self.feeder.next_key() != (epoch, step) or self._boxes_version() != self._box_version:
            self._build(step)  # first epoch, resume, the last pass stopped early, or new boxes: start afresh
        tries = 0
        while step < len(self):
            try:
                outs = self.pipe.run()  # one TensorList per view
            except Exception as e:  # noqa: BLE001 - decoder errors come as RuntimeError
                tries += 1
                self._recover(step, e, tries)
                continue
            got_epoch, got_step, _, labels, idx = self.feeder.pending.popleft()
            assert (got_epoch, got_step) == (epoch, step), ((got_epoch, got_step), (epoch, step))
            x1 = self._owned(outs[0])  # (N, S, S, 3) uint8
            x2 = self._owned(outs[1]) if self.views == 2 else None
            labels_t = torch.from_numpy(labels).to(self.device, non_blocking=True)
            yield self.stage(x1, x2, labels_t, torch.from_numpy(idx), epoch, step)
            step += 1


class DaliEvalLoader(_DaliLoader):
    """Iterable of (x, labels, index) for kNN banks and linear probes (the interface of
    TorchvisionEvalLoader): x (n, 3, S, S) = stage.normalize of the centre crop, labels (n,) int64 on the
    device, index (n,) int64 folder positions on the host. The split is sharded with padding (ranks get
    equal counts); callers drop repeated indices. resize: the shorter side before the crop (0: round(size * 8/7),
    as eval_transform)."""

    def __init__(
        self,
        index: FolderIndex,
        size: int,
        resize: int,
        stage: MixStage,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        threads: int = 2,
        device: str | torch.device = "cpu",
        prefetch: int = 2,
        hw_decoder_load: float = 0.65,
    ):
        super().__init__(device, threads, prefetch, hw_decoder_load)
        self.size, self.resize = size, resize or round(size * 8 / 7)
        self.stage, self.batch_size, self.classes = stage, batch_size, index.classes
        self.feeder = _EvalFeeder(index, batch_size, rank, world, self._bad)

    def __len__(self) -> int:
        return self.feeder.per_pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the order does not depend on it

    def _build(self, batch_index: int) -> None:
        self.pipe = None
        self.feeder.start(batch_index)
        self.pipe = _eval_pipeline(self.feeder, self.size, self.resize, self.batch_size, self.threads,
                                   self._device_id(), self.prefetch, self.hw_decoder_load)
        self.pipe.build()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.pipe is None or self.feeder.next_key() != 0:
            self._build(0)  # first pass, or the last one stopped early
        step, tries = 0, 0
        while step < len(self):
            try:
                (out,) = self.pipe.run()
            except Exception as e:  # noqa: BLE001 - decoder errors come as RuntimeError
                tries += 1
                self._recover(step, e, tries)
                continue
            got, count, _, labels, idx = self.feeder.pending.popleft()
            assert got == step, (got, step)
            v = self._owned(out)[:count]  # (n, S, S, 3) uint8 without the padding
            labels_t = torch.from_numpy(labels).to(self.device, non_blocking=True)
            yield self.stage.normalize(v), labels_t, torch.from_numpy(idx)
            step += 1
