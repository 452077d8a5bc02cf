"""mixmask: self-supervised pretraining (MoCo v2, SimCLR, BYOL, SimSiam, Barlow Twins with MixMask; CMAE on ViTs), and its evaluations.

    accelerate launch train.py [--config FILE ...] [section.field=value ...]        pretrain
    accelerate launch train.py linear [--config FILE ...] [eval.checkpoint=PATH ...] linear probe
    accelerate launch train.py knn [--config FILE ...] [eval.checkpoint=PATH ...]    kNN top-1
    accelerate launch train.py finetune [...] [finetune.*=...]       supervised fine-tuning, every label
    accelerate launch train.py semisup [...] [finetune.fraction=0.01]   the same on a per-class label share
    python train.py export [--out DIR] [--formats torchvision,timm,detectron2] [eval.checkpoint=PATH]
    python train.py show-batch [--out PNG] [--samples N] [data.backend=...] [mask.method=...]   one batch as a grid
    python train.py report RUN_DIR [RUN_DIR ...] [--out DIR]        results table (markdown) and plots
    python train.py check [--config FILE ...] [data.root=DIR]    list the images the backend cannot decode
    python train.py write-beton [--overwrite] [--config FILE ...] [data.ffcv_*=...]   ImageFolder -> .beton

Without --config, configs/demo.yaml and configs/demo_<framework>.yaml are used (the embedded demo
dataset; the framework from a model.framework=... override, else moco_v2). Plain ``python train.py``
works too (one process). Outputs go to <run.out_dir>/<run.name>/ (see README.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from loaders.demo import ensure_demo_dataset
from mixmask.mixing import MixStage
from loaders.folder import DataError, index_split
from loaders.torchvision_backend import AugParams, TorchvisionEvalLoader, TorchvisionTrainLoader, eval_transform
from loaders.watchdog import watch
from mixmask.config import Config, ConfigError, load_config, parse_cli_overrides
from mixmask.evaluation import knn_top1, linear_probe

CONFIGS = Path(__file__).resolve().parent / "configs"
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("mixmask")


def derived(cfg: Config, world: int, steps_per_epoch: int, grad_accum: int = 0) -> dict:
    """Every value computed from the config, in one place (logged and stored in the summary and in every
    checkpoint's config.json, where a resume reads the layout back). grad_accum: the effective one (0: the
    config's; run.resize=keep_global_batch may change it on resume, see resume_layout)."""
    grad_accum = grad_accum or cfg.optim.grad_accum
    global_batch = cfg.data.batch_size * world * grad_accum
    return {
        "world_size": world,
        "batch_size": cfg.data.batch_size,  # per process
        "grad_accum": grad_accum,
        "global_batch": global_batch,
        "lr": cfg.optim.lr * global_batch / 256,  # linear scaling rule
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": round(cfg.optim.warmup_epochs * steps_per_epoch),
    }


def layout_text(world: int, batch: int, accum: int) -> str:
    return f"{world} process(es) x data.batch_size {batch} x grad_accum {accum} = global batch {world * batch * accum}"


def resume_layout(cfg: Config, world: int, loader_batches: int, ckpt: Path | None) -> dict:
    """How a run resumes on this layout (``run.resize``; README "Reliability and scale").
    -> {"grad_accum": the effective one, "state": TrainState fields to set after loading the checkpoint,
        "from": the checkpoint's layout when it differs from this run's (else None), "note": a log line or None}

    The checkpoint's layout (its config.json "derived": processes x data.batch_size x grad_accum = global batch)
    is compared with this run's (``world`` x data.batch_size x optim.grad_accum). The epoch's order is a
    permutation keyed by (seed, epoch) and step k of every layout trains on its samples [k G, (k + 1) G) for a
    global batch G (loaders/sharding.py), so the data position is the count of samples consumed in the epoch.
    When the layouts differ:
    keep_global_batch: grad_accum = the stored global batch / (data.batch_size x world): the global batch, the
        lr, the optimizer steps and the steps per epoch stay; the epoch continues at micro-batch
        step_in_epoch x grad_accum, i.e. at the same sample.
    rescale_lr: data.batch_size and optim.grad_accum as asked, so a new global batch G' and lr = optim.lr x G' / 256;
        step_in_epoch = the samples consumed in the epoch / G' (the same sample) and step = epoch x the new
        steps per epoch + step_in_epoch: the schedule's position, a fraction of the training in samples, in the
        new step units (total and warm-up steps are recomputed from the new steps per epoch; run.max_steps
        counts new steps).
    A global batch or a sample count that does not divide is a ConfigError (one line)."""
    from mixmask.checkpoint import read_tree

    plan = {"grad_accum": cfg.optim.grad_accum, "state": {}, "from": None, "note": None}
    if ckpt is None or not (ckpt / "config.json").is_file() or not (ckpt / "state.json").is_file():
        return plan  # nothing to resume (load_checkpoint names what is missing)
    stored, saved = json.loads((ckpt / "config.json").read_text()), read_tree(ckpt, "state")
    train = saved.get("states", {}).get("train")
    if train is None:
        return plan
    d0, c0 = stored.get("derived", {}), stored.get("config", {})
    w0 = d0.get("world_size", saved.get("processes", world))
    b0 = d0.get("batch_size", c0.get("data", {}).get("batch_size", cfg.data.batch_size))
    a0 = d0.get("grad_accum", c0.get("optim", {}).get("grad_accum", cfg.optim.grad_accum))
    g0, epoch, step = w0 * b0 * a0, train.get("epoch", 0), train.get("step", 0)
    used = train.get("epoch_samples", train.get("step_in_epoch", 0) * g0)  # older checkpoints: from the steps
    plan["state"] = {"samples": train.get("samples", step * g0), "epoch_samples": used}
    b, a = cfg.data.batch_size, cfg.optim.grad_accum
    if (w0, b0, a0) == (world, b, a):
        return plan
    was = layout_text(w0, b0, a0)
    plan["from"] = {"world_size": w0, "batch_size": b0, "grad_accum": a0, "global_batch": g0, "resize": cfg.run.resize}
    if cfg.run.resize == "keep_global_batch":
        if g0 % (b * world):
            hint = (f"set data.batch_size to a divisor of {g0 // world} or run.resize=rescale_lr" if g0 % world == 0
                    else f"no data.batch_size divides it on {world} process(es): set run.resize=rescale_lr")
            raise ConfigError(f"run.resize=keep_global_batch: the checkpoint's global batch {g0} ({was}) is not "
                              f"data.batch_size {b} x {world} process(es) x a whole optim.grad_accum; {hint}")
        ga = plan["grad_accum"] = g0 // (b * world)
        if (w0, b0, a0) == (world, b, ga):  # the same layout as before (optim.grad_accum adapted earlier)
            plan["from"] = None
            return plan
        plan["note"] = (f"resumed on another layout: {was} -> {layout_text(world, b, ga)} (run.resize="
                        f"keep_global_batch: global batch, lr, steps per epoch and schedule unchanged"
                        + (f"; optim.grad_accum={a} overridden" if a != ga else "") + ")")
        return plan
    g = world * b * a
    if used % g:
        hint = (f"data.batch_size x optim.grad_accum dividing {used // world}" if used % world == 0
                else "another number of processes")
        raise ConfigError(f"run.resize=rescale_lr: the checkpoint is {used} samples into epoch {epoch}, not a multiple "
                          f"of the new global batch {g} ({layout_text(world, b, a)}); set run.resize=keep_global_batch "
                          f"or use {hint}")
    steps_per_epoch, in_epoch = loader_batches // a, used // g
    plan["state"].update(epoch=epoch, step_in_epoch=in_epoch, step=epoch * steps_per_epoch + in_epoch)
    plan["note"] = (f"resumed on another layout: {was} -> {layout_text(world, b, a)} (run.resize=rescale_lr: lr "
                    f"{cfg.optim.lr * g0 / 256:g} -> {cfg.optim.lr * g / 256:g}; {used} samples into epoch {epoch} = "
                    f"step {in_epoch} of {steps_per_epoch}; optimizer step {step} -> {plan['state']['step']})")
    return plan


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def make_accelerator(cfg: Config, run_dir: Path, trackers: bool):
    from accelerate import Accelerator

    precision = None if cfg.run.precision == "auto" else cfg.run.precision
    return Accelerator(
        mixed_precision=precision,
        log_with="tensorboard" if trackers else None,
        project_dir=str(run_dir),
    )


def data_root(cfg: Config, accelerator) -> Path:
    if cfg.data.root:
        return Path(cfg.data.root)
    with accelerator.main_process_first():
        return ensure_demo_dataset()


def default_configs(overrides: list[str]) -> list[Path]:
    """The demo recipe: configs/demo.yaml, then the overlays of the framework and the mixing method that the
    ``model.framework=...`` / ``mask.method=...`` overrides name (else moco_v2 and mixmask), where they exist."""
    asked = parse_cli_overrides(overrides)
    framework = asked.get("model", {}).get("framework", "moco_v2")
    method = asked.get("mask", {}).get("method", "mixmask")
    overlays = [CONFIGS / f"demo_{framework}.yaml", CONFIGS / f"demo_mask_{method}.yaml"]
    return [CONFIGS / "demo.yaml"] + [p for p in overlays if p.is_file()]


def backbone_spec(cfg: Config):
    from mixmask.models import BackboneSpec

    m = cfg.model
    return BackboneSpec(m.arch, m.stem, cfg.data.image_size, m.patch_size, m.vit_depth)


def token_grid(cfg: Config) -> int | None:
    """A ViT's patch grid side (for pictures of token masking), None for ResNets."""
    from mixmask.models import is_vit

    return cfg.data.image_size // cfg.model.patch_size if is_vit(cfg.model.arch) else None


def build_model(cfg: Config, world: int):
    """The model.framework's model from its config section (mixmask/frameworks FRAMEWORKS)."""
    import torch.distributed as dist

    from mixmask.frameworks import FRAMEWORKS

    model = FRAMEWORKS[cfg.model.framework](cfg.framework, arch=backbone_spec(cfg), seed=cfg.run.seed,
                                            group=dist.group.WORLD if world > 1 else None)
    model.batch_views = cfg.model.batch_views  # views in one forward, BN statistics per view (frameworks/base.py)
    return model


def compile_model(cfg: Config, model):
    """model.compile's torch.compile of the framework's networks, in place (state_dict keys, checkpoints and
    resume are unchanged; frameworks/base.compile_networks); returns the model. After channels_last."""
    if cfg.model.compile != "none":
        from mixmask.frameworks.base import compile_networks

        compiled = compile_networks(model, cfg.model.compile, cfg.model.compile_dynamic, cfg.model.compile_backend)
        log.info("torch.compile (%s, %s, dynamic=%s): %s", cfg.model.compile, cfg.model.compile_backend,
                 cfg.model.compile_dynamic, ", ".join(compiled))
    return model


def make_optimizer(cfg: Config, model, lr: float):
    """The optim.optimizer over the framework's parameter groups (biases/BN excluded when asked)."""
    from mixmask.optim import build_optimizer

    o = cfg.optim
    groups = model.param_groups(weight_decay=o.weight_decay, exclude_bias_bn=o.exclude_bias_bn)
    return build_optimizer(o.optimizer, groups, lr=lr, momentum=o.momentum, lars_trust=o.lars_trust, betas=o.betas)


def make_stage(cfg: Config, accelerator, masking: bool) -> MixStage:
    """The device stage of every backend: normalisation and, when masking, mask.method's mixer (MIXERS)."""
    from mixmask.frameworks import FRAMEWORKS
    from mixmask.mixing import MIXERS, TokenMasking

    m = cfg.mask
    tokens = None
    if masking and FRAMEWORKS[cfg.model.framework].masks_tokens:  # masked image modelling: batch.keep
        tokens = TokenMasking(cfg.data.image_size // cfg.model.patch_size, cfg.framework.mask_ratio)
    return MixStage(
        cfg.data.mean, cfg.data.std, dtype=DTYPES.get(accelerator.mixed_precision, torch.float32),
        channels_last=cfg.data.channels_last,
        mixer=MIXERS[m.method].from_config(cfg) if masking and m.enabled else None, seed=cfg.run.seed,
        rank=accelerator.process_index, world=accelerator.num_processes, route=m.route, tokens=tokens,
    )


def watched(build):
    """A loader builder whose loader comes wrapped in a Watchdog when data.timeout > 0 (loaders/watchdog.py):
    a loader that produces no batch for data.timeout seconds raises DataError instead of hanging."""
    @functools.wraps(build)
    def wrapper(cfg: Config, *args, **kwargs):
        return watch(build(cfg, *args, **kwargs), cfg.data.timeout)

    return wrapper


@watched
def eval_loader(cfg: Config, accelerator, root: Path, split: str, transform=None):
    """One centre-cropped view per image (resize the shorter side to data.eval_resize, crop data.eval_size, else
    data.image_size), decoded once, through data.backend; padded shards (callers drop repeats by index).
    ``transform``: a torchvision transform instead (ContrastiveCrop's whole-image pass), read by the torchvision
    loader."""
    d, rank, world = cfg.data, accelerator.process_index, accelerator.num_processes
    size = d.eval_size or d.image_size
    stage, resize = make_stage(cfg, accelerator, masking=False), d.eval_resize or round(size * 8 / 7)
    if transform is None and d.backend == "dali":
        from loaders.dali_backend import DaliEvalLoader

        return DaliEvalLoader(index_split(root, split), size, resize, stage, d.batch_size, rank, world,
                              threads=max(1, d.workers), device=accelerator.device)
    if transform is None and d.backend == "ffcv":
        from loaders.ffcv_backend import FfcvEvalLoader

        return FfcvEvalLoader(beton(cfg, accelerator, root, split), size, resize, stage, d.batch_size, rank,
                              world, workers=d.workers, device=accelerator.device)
    return TorchvisionEvalLoader(index_split(root, split), transform or eval_transform(size, resize), stage,
                                 batch_size=d.batch_size, rank=rank, world=world, workers=d.workers, seed=cfg.run.seed,
                                 device=accelerator.device)


def pretrain_aug(cfg: Config, crop_alpha: float = 0.0) -> AugParams:
    """The pretraining views: the data section's recipe and its progressive resolution (data.size_start,
    size_ramp, size_step: the loaders make epoch e's views at aug.size_at(e), mixmask/resolution.py)."""
    d = cfg.data
    return AugParams(d.image_size, d.crop_scale, d.crop_ratio, d.flip_p, d.jitter, d.jitter_p, d.gray_p, d.blur_p,
                     d.blur_sigma, d.solarize_p, crop_alpha=crop_alpha, size_start=d.size_start,
                     size_ramp=d.size_ramp, size_step=d.size_step)


def size_schedule_text(cfg: Config) -> str:
    """'16 px epochs 0-3, 24 px epoch 4, 32 px epochs 5-9': the view side of every epoch, as runs."""
    from mixmask.resolution import view_sizes

    d, runs = cfg.data, []
    for e, s in enumerate(view_sizes(cfg.optim.epochs, d.image_size, d.size_start, d.size_ramp, d.size_step)):
        if runs and runs[-1][0] == s:
            runs[-1][2] = e
        else:
            runs.append([s, e, e])
    return ", ".join(f"{s} px epoch{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}" for s, a, b in runs)


def one_view_aug(cfg: Config, crop_scale: tuple[float, float]) -> AugParams:
    """RandomResizedCrop + horizontal flip, no colour: the views of fine-tuning and the augmented linear probe,
    at data.image_size every epoch (progressive resolution is pretraining's: its epochs are optim.epochs)."""
    d = cfg.data
    return AugParams(d.image_size, crop_scale, d.crop_ratio, 0.5, (0.0, 0.0, 0.0, 0.0), 0.0, 0.0, 0.0, d.blur_sigma, 0.0)


def features_fn(model, accelerator):
    net = accelerator.unwrap_model(model)

    def features(x: torch.Tensor) -> torch.Tensor:
        net.eval()
        with torch.no_grad(), accelerator.autocast():
            return net.features(x)

    return features


def knn_monitor(cfg: Config, model, accelerator, root: Path):
    bank = eval_loader(cfg, accelerator, root, "train")
    query = eval_loader(cfg, accelerator, root, "val")
    num_classes = len(bank.classes)

    def run() -> dict[str, float]:
        return {"knn_top1": knn_top1(
            features_fn(model, accelerator), bank, query, num_classes, cfg.run.knn_k, cfg.run.knn_t,
            gather=accelerator.gather, progress=cfg.run.progress and accelerator.is_main_process,
        )}

    return run


def beton_writer_args(cfg: Config, progress: bool) -> dict:
    d = cfg.data
    return dict(write_mode=d.ffcv_write_mode, max_resolution=d.ffcv_max_resolution, jpeg_quality=d.ffcv_jpeg_quality,
                compress_probability=d.ffcv_compress_probability, workers=max(1, d.workers), progress=progress)


def beton_dir(cfg: Config, root: Path) -> Path:
    return Path(cfg.data.beton_dir) if cfg.data.beton_dir else root / "ffcv"


def beton(cfg: Config, accelerator, root: Path, split: str) -> Path:
    """<beton_dir>/<split>.beton, written once by the main process on first use."""
    from loaders.ffcv_backend import ensure_beton

    with accelerator.main_process_first():
        return ensure_beton(root, split, beton_dir(cfg, root),
                            **beton_writer_args(cfg, cfg.run.progress and accelerator.is_main_process))


@watched
def train_loader(cfg: Config, accelerator, index, aug: AugParams, boxes=None, *, views: int = 2, indices=None,
                 batch_size: int = 0):
    """The training loader of data.backend: Batch of ``views`` views (1: x1 only, for supervised training and
    probes: no masking), of the images at folder positions ``indices`` (None: all); boxes: ContrastiveCrop's
    shared box table (mixmask/crops.py), or None."""
    d, rank, world = cfg.data, accelerator.process_index, accelerator.num_processes
    stage, batch = make_stage(cfg, accelerator, masking=views == 2), batch_size or d.batch_size
    common = dict(views=views, indices=indices, boxes=boxes)
    if d.backend == "ffcv":
        from loaders.ffcv_backend import FfcvTrainLoader

        return FfcvTrainLoader(beton(cfg, accelerator, index.root.parent, "train"), aug, stage, batch, rank, world,
                               d.workers, cfg.run.seed, accelerator.device, d.ffcv_os_cache, d.ffcv_order,
                               batches_ahead=d.prefetch, **common)
    args = (index, aug, stage, batch, rank, world, d.workers, d.prefetch, cfg.run.seed, accelerator.device)
    if d.backend == "dali":
        from loaders.dali_backend import DaliTrainLoader

        return DaliTrainLoader(*args, hw_decoder_load=d.hw_decoder_load, **common)
    return TorchvisionTrainLoader(*args, **common)


def box_updater(cfg: Config, crop, model, accelerator, root: Path):
    """ContrastiveCrop's ``before_epoch``: when due, recompute every image's box from the online model's
    feature_map over the whole training images (resized to the view size), on every process."""
    from mixmask.crops import whole_image_transform

    size = cfg.ccrop.size or cfg.data.image_size
    whole = eval_loader(cfg, accelerator, root, "train", whole_image_transform(size))

    def update(epoch: int) -> None:
        if not crop.due(epoch):
            return
        net = accelerator.unwrap_model(model)

        def feature_map(x: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                return net.feature_map(x)

        net.eval()
        crop.update(feature_map, whole, size, gather=accelerator.gather if accelerator.num_processes > 1 else None,
                    progress=cfg.run.progress and accelerator.is_main_process)
        net.train()
        area = (crop.table.array[:, 2:] - crop.table.array[:, :2]).prod(1)
        log.info("ContrastiveCrop boxes updated before epoch %d: mean box area %.2f of the image", epoch, area.mean())

    return update


def cmd_check(cfg: Config) -> int:
    """Pre-flight: every train/val image the data.backend decoder rejects, one line each."""
    root = Path(cfg.data.root) if cfg.data.root else ensure_demo_dataset()
    paths = [p for split in ("train", "val") for p in index_split(root, split).paths]
    if cfg.data.backend == "dali":
        from loaders.dali_backend import find_undecodable

        bad = find_undecodable(paths, threads=max(1, cfg.data.workers), progress=cfg.run.progress)
    else:
        from loaders.torchvision_backend import find_unreadable

        bad = find_unreadable(paths, progress=cfg.run.progress)
    for path, why in bad:
        print(f"{path}\t{why}")
    print(f"{len(bad)} of {len(paths)} images cannot be decoded by the {cfg.data.backend} backend", file=sys.stderr)
    return 1 if bad else 0


def cmd_write_beton(cfg: Config, overwrite: bool) -> int:
    """Write <beton_dir>/train.beton and val.beton from the ImageFolder at data.root (or the demo set)."""
    from loaders.ffcv_backend import write_beton

    root = Path(cfg.data.root) if cfg.data.root else ensure_demo_dataset()
    out = beton_dir(cfg, root)
    for split in ("train", "val"):
        f = write_beton(root, split, out / f"{split}.beton", overwrite=overwrite, **beton_writer_args(cfg, cfg.run.progress))
        print(f"{f['path']}: {f['samples']} images, {f['classes']} classes, {f['bytes'] / 1e6:.1f} MB, "
              f"{len(f['skipped'])} skipped, {f['seconds']:.1f} s ({f['write_mode']})")
        for bad in f["skipped"]:
            print(f"  skipped {bad}")
    return 0


def exit_if_interrupted(accelerator, facts: dict, state, run_dir: Path) -> None:
    """After fit: a run stopped by a signal (its checkpoint written) exits with 128 + the signal."""
    if facts["interrupted"]:
        if accelerator.is_main_process:
            print(f"interrupted at step {state.step}: checkpoint written in {run_dir}; "
                  "run the same command again to resume", file=sys.stderr)
        accelerator.end_training()
        raise SystemExit(128 + facts["interrupted"])


def cmd_train(cfg: Config) -> dict:
    from accelerate.utils import set_seed

    from mixmask.checkpoint import latest_checkpoint, load_checkpoint, register_state
    from mixmask.engine import TrainState, fit, log_metrics

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg, run_dir, trackers=True)
    started = time.perf_counter()
    set_seed(cfg.run.seed)
    root = data_root(cfg, accelerator)
    train_index = index_split(root, "train")
    index_split(root, "val")  # fail early on a bad val split
    crop = None
    if cfg.ccrop.enabled:  # ContrastiveCrop: a shared box table, created before the loader's workers start
        from mixmask.crops import ContrastiveCrop

        crop = ContrastiveCrop(cfg.ccrop, len(train_index))
    aug = pretrain_aug(cfg, crop_alpha=cfg.ccrop.alpha if crop else 0.0)
    if cfg.data.size_start and accelerator.is_main_process:
        log.info("progressive resolution: %s", size_schedule_text(cfg))
    loader = train_loader(cfg, accelerator, train_index, aug, boxes=crop.table if crop else None)
    preview = None
    if cfg.run.show_every and accelerator.is_main_process:  # the batch as the model sees it, in TensorBoard
        from mixmask.visualize import BatchPreview

        def show(grid, count: int) -> None:
            accelerator.get_tracker("tensorboard", unwrap=True).add_image("batch", grid, count, dataformats="HWC")

        loader = preview = BatchPreview(loader, cfg.run.show_every, show, cfg.data.mean, cfg.data.std,
                                        token_grid=token_grid(cfg))
    ckpt = latest_checkpoint(run_dir) if cfg.run.resume else None
    plan = resume_layout(cfg, accelerator.num_processes, len(loader), ckpt)  # run.resize: another layout
    grad_accum = plan["grad_accum"]
    d = derived(cfg, accelerator.num_processes, len(loader) // grad_accum, grad_accum)
    if plan["from"]:
        d["resized_from"] = plan["from"]
    model = build_model(cfg, accelerator.num_processes)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compile_model(cfg, model)
    optimizer = make_optimizer(cfg, model, d["lr"])
    model, optimizer = accelerator.prepare(model, optimizer)
    saliency = getattr(loader.stage.mixer, "saliency", None)
    if saliency is not None and saliency.wants_encoder:  # saliency.source=encoder: the model's own target map
        saliency.feature_map = accelerator.unwrap_model(model).target_feature_map
    state = TrainState()  # fit saves it in every checkpoint (as "train")
    if crop is not None:  # the boxes are saved in every checkpoint and restored in place on resume
        register_state(accelerator, "ccrop", crop)
    resolved = {"config": cfg.to_dict(), "derived": d, "git_sha": git_sha()}
    if ckpt is not None:  # safetensors + JSON only: nothing in the checkpoint is unpickled
        load_checkpoint(accelerator, ckpt, model, optimizer, {"train": state})
        for k, v in plan["state"].items():  # the sample counts; with run.resize=rescale_lr, the new step units
            setattr(state, k, v)
        if plan["note"] and accelerator.is_main_process:
            log.info(plan["note"])
        log.info("resumed from %s at epoch %d, step %d", ckpt, state.epoch, state.step)
        if preview is not None:  # the TensorBoard batch grids keep counting batches across the resume
            preview.count = state.step * grad_accum
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        log.info("run %s: %s", run_dir, json.dumps(d))
    flat = {f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
            for s, sec in cfg.to_dict().items() for k, v in sec.items()}
    accelerator.init_trackers("tb", config=flat)
    monitor = knn_monitor(cfg, model, accelerator, root)
    if "knn_top1_init" not in state.monitors:
        state.monitors["knn_top1_init"] = monitor()["knn_top1"]
        log.info("kNN top-1 before training: %.2f%%", state.monitors["knn_top1_init"])
        log_metrics(accelerator, run_dir, state, {"knn_top1": state.monitors["knn_top1_init"]})
    knn_init = state.monitors["knn_top1_init"]
    facts = fit(
        accelerator, model, optimizer, loader, state, run_dir=run_dir, config=resolved,
        epochs=cfg.optim.epochs, base_lr=d["lr"], warmup_steps=d["warmup_steps"], grad_accum=grad_accum,
        checkpoint_every=cfg.run.checkpoint_every, keep_checkpoints=cfg.run.keep_checkpoints,
        max_steps=cfg.run.max_steps, log_every=cfg.run.log_every, monitor=monitor,
        monitor_every=cfg.run.knn_every, progress=cfg.run.progress,
        before_epoch=box_updater(cfg, crop, model, accelerator, root) if crop else None,
    )
    exit_if_interrupted(accelerator, facts, state, run_dir)
    knn_final = monitor()["knn_top1"]
    log_metrics(accelerator, run_dir, state, {"knn_top1": knn_final})
    summary = {
        "epochs": state.epoch,
        **facts,
        "knn_top1": knn_final,
        "knn_top1_init": knn_init,
        "wall_seconds": time.perf_counter() - started,
        **resolved,
    }
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"done: {state.epoch} epochs, {state.step} steps, {facts['images_per_sec']:.0f} img/s, "
            f"kNN top-1 {knn_init:.2f}% -> {knn_final:.2f}%  ({run_dir / 'summary.json'})"
        )
    accelerator.end_training()
    return summary


def load_pretrained(cfg: Config, accelerator):
    """The model of ``eval.checkpoint`` (default: the run's latest), built from its stored config (which sets
    cfg's model section, the framework's section and, for ViTs, data.image_size)."""
    from safetensors.torch import load_file

    from mixmask.checkpoint import resolve_weights
    from mixmask.config import apply_overrides
    from mixmask.export import ExportError, backbone_prefix, backbone_state, check_backbone
    from mixmask.models import is_vit

    weights = resolve_weights(cfg.eval.checkpoint or Path(cfg.run.out_dir) / cfg.run.name)
    stored = weights.parent / "config.json"
    if stored.is_file():  # the framework and architecture come from the checkpoint, not the current config
        saved = json.loads(stored.read_text())["config"]
        framework = saved["model"]["framework"]
        stored_sections = {"model": saved["model"], framework: saved.get(framework, {})}
        if is_vit(saved["model"]["arch"]):  # a ViT's positional embedding fixes the image size
            stored_sections["data"] = {"image_size": saved["data"]["image_size"]}
        apply_overrides(cfg, stored_sections, str(stored))
        if is_vit(cfg.model.arch) and cfg.data.eval_size not in (0, cfg.data.image_size):
            raise ConfigError(f"data.eval_size={cfg.data.eval_size}: the checkpoint is a ViT ({cfg.model.arch}) whose "
                              f"positional embedding fixes its input side at {cfg.data.image_size}; set data.eval_size=0")
    model = build_model(cfg, 1)
    state = load_file(str(weights))
    try:
        check_backbone(backbone_state(state, backbone_prefix(cfg.model.framework)), backbone_spec(cfg), str(weights))
        model.load_state_dict(state)
    except (ExportError, RuntimeError) as e:  # a checkpoint of another architecture or framework
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"the checkpoint does not fit model.framework={cfg.model.framework} model.arch={cfg.model.arch}"
                          f"{'' if stored.is_file() else ' (no config.json beside it: set model.* to its architecture)'}"
                          f": {first}") from None
    return model.to(accelerator.device), weights


def results_path(weights: Path, name: str) -> Path:
    """Where an evaluation of ``weights`` writes ``name`` (linear.json, semisup_1.json, ...): beside it."""
    return weights.parent / name


def probe_loader(cfg: Config, accelerator, index):
    """(x, labels, index) batches of one RandomResizedCrop (scale 0.08-1) + flip view per image, on data.backend:
    the augmented linear probe's training views."""
    from mixmask.evaluation import FirstView

    return FirstView(train_loader(cfg, accelerator, index, one_view_aug(cfg, (0.08, 1.0)), views=1))


def cmd_eval(cfg: Config, kind: str) -> dict:
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    accelerator = make_accelerator(cfg, run_dir, trackers=False)
    root = data_root(cfg, accelerator)
    model, weights = load_pretrained(cfg, accelerator)
    features = features_fn(model, accelerator)
    progress = cfg.run.progress and accelerator.is_main_process
    if kind == "knn":
        monitor = knn_monitor(cfg, model, accelerator, root)
        result = {**monitor(), "k": cfg.run.knn_k, "t": cfg.run.knn_t}
    else:
        e = cfg.eval
        index = index_split(root, "train")
        train = probe_loader(cfg, accelerator, index) if e.augment else eval_loader(cfg, accelerator, root, "train")
        val = eval_loader(cfg, accelerator, root, "val")
        result = linear_probe(
            features, model.width, train, val, len(index.classes), e.epochs, e.lr, e.weight_decay, e.milestones,
            e.augment, e.batch_size, accelerator.device, accelerator.gather, train.set_epoch, progress, cfg.run.seed,
        )
        result.update(epochs=e.epochs, lr=e.lr, augment=e.augment)
    result.update(checkpoint=str(weights), backend=cfg.data.backend, processes=accelerator.num_processes)
    if accelerator.is_main_process:
        out = results_path(weights, f"{kind}.json")
        out.write_text(json.dumps(result, indent=2))
        print(f"{kind}: top-1 {result.get('top1', result.get('knn_top1')):.2f}%  ({out})")
    return result


def cmd_finetune(cfg: Config, semisup: bool) -> dict:
    """Supervised fine-tuning of a checkpoint's backbone, end to end, through the engine (resumable): on every
    training label (``finetune``) or on a fixed per-class share (``semisup``, finetune.fraction). Runs in
    <pretraining run>/<tag>/ (tag finetune or semisup_<percent>); the result also goes beside the checkpoint
    as <tag>.json."""
    from loaders.folder import label_subset, load_subset, save_subset
    from mixmask.checkpoint import latest_checkpoint, load_checkpoint, resolve_weights
    from mixmask.engine import TrainState, fit, log_metrics
    from mixmask.evaluation import top1_accuracy
    from mixmask.frameworks.supervised import Supervised
    from mixmask.optim import build_optimizer

    f, started = cfg.finetune, time.perf_counter()
    weights = resolve_weights(cfg.eval.checkpoint or Path(cfg.run.out_dir) / cfg.run.name)
    tag = f"semisup_{f.fraction * 100:g}" if semisup else "finetune"
    run_dir = (weights.parent.parent if weights.parent.name.startswith("checkpoint-") else weights.parent) / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg, run_dir, trackers=True)
    cfg.eval.checkpoint = str(weights)
    pretrained, _ = load_pretrained(cfg, accelerator)  # sets cfg.model from the checkpoint
    root = data_root(cfg, accelerator)
    index = index_split(root, "train")
    positions = None
    if semisup:  # the subset: the run's own (resume), a given file, or drawn from the seed; written to the run
        mine = run_dir / "subset.json"
        source = mine if mine.is_file() else Path(f.subset) if f.subset else None
        positions = load_subset(source, index) if source else label_subset(index, f.fraction, cfg.run.seed)
        if accelerator.is_main_process and not mine.is_file():
            save_subset(mine, index, positions, fraction=f.fraction, seed=cfg.run.seed, source=str(source or "seed"))
    images = len(index) if positions is None else len(positions)
    batch = f.batch_size or cfg.data.batch_size
    if images < batch * accelerator.num_processes:
        raise DataError(f"{images} labelled images cannot fill one batch of {batch} on each of "
                        f"{accelerator.num_processes} process(es); set finetune.batch_size <= "
                        f"{images // accelerator.num_processes}")
    loader = train_loader(cfg, accelerator, index, one_view_aug(cfg, f.crop_scale), views=1, indices=positions,
                          batch_size=batch)
    steps_per_epoch = len(loader)
    global_batch = batch * accelerator.num_processes
    d = {"world_size": accelerator.num_processes, "global_batch": global_batch, "lr": f.lr * global_batch / 256,
         "steps_per_epoch": steps_per_epoch, "warmup_steps": round(f.warmup_epochs * steps_per_epoch),
         "labelled_images": images}
    model = Supervised(len(index.classes), arch=backbone_spec(cfg), label_smoothing=f.label_smoothing)
    model.backbone.load_state_dict(pretrained.backbone.state_dict())
    del pretrained
    groups = model.param_groups(weight_decay=f.weight_decay, exclude_bias_bn=True)
    optimizer = build_optimizer(f.optimizer, groups, lr=d["lr"], momentum=f.momentum, betas=f.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()  # fit saves it in every checkpoint (as "train")
    resolved = {"config": cfg.to_dict(), "derived": d, "git_sha": git_sha(), "pretrained": str(weights),
                "command": "semisup" if semisup else "finetune"}
    ckpt = latest_checkpoint(run_dir) if cfg.run.resume else None
    if ckpt is not None:  # safetensors + JSON only: nothing in the checkpoint is unpickled
        load_checkpoint(accelerator, ckpt, model, optimizer, {"train": state})
        log.info("resumed from %s at epoch %d, step %d", ckpt, state.epoch, state.step)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        log.info("%s of %s: %s", tag, weights, json.dumps(d))
    accelerator.init_trackers("tb")
    val = eval_loader(cfg, accelerator, root, "val")
    net = accelerator.unwrap_model(model)

    def monitor() -> dict[str, float]:
        def logits(x: torch.Tensor) -> torch.Tensor:
            net.eval()
            with torch.no_grad(), accelerator.autocast():
                return net.logits(x)

        return {"val_top1": top1_accuracy(logits, val, accelerator.gather,
                                          progress=cfg.run.progress and accelerator.is_main_process)}

    facts = fit(accelerator, model, optimizer, loader, state, run_dir=run_dir, config=resolved, epochs=f.epochs,
                base_lr=d["lr"], warmup_steps=d["warmup_steps"], checkpoint_every=cfg.run.checkpoint_every,
                keep_checkpoints=cfg.run.keep_checkpoints, max_steps=cfg.run.max_steps, log_every=cfg.run.log_every,
                monitor=monitor, monitor_every=f.eval_every, progress=cfg.run.progress)
    exit_if_interrupted(accelerator, facts, state, run_dir)
    top1 = monitor()["val_top1"]
    log_metrics(accelerator, run_dir, state, {"val_top1": top1})
    result = {"top1": top1, "kind": "semisup" if semisup else "finetune", "fraction": f.fraction if semisup else 1.0,
              "labelled_images": images, "epochs": state.epoch, "steps": state.step, "lr": d["lr"],
              "optimizer": f.optimizer, "label_smoothing": f.label_smoothing, "backend": cfg.data.backend,
              "processes": accelerator.num_processes, "images_per_sec": facts["images_per_sec"],
              "wall_seconds": time.perf_counter() - started, "checkpoint": str(weights), "run_dir": str(run_dir)}
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps({**facts, **result, **resolved}, indent=2))
        out = results_path(weights, f"{tag}.json")
        out.write_text(json.dumps(result, indent=2))
        print(f"{tag}: val top-1 {top1:.2f}% after {state.epoch} epochs on {images} labelled images "
              f"({facts['images_per_sec']:.0f} img/s)  ({out})")
    accelerator.end_training()
    return result


def cmd_export(cfg: Config, out: str, formats: list[str]) -> int:
    """The backbone of eval.checkpoint as standalone files for torchvision, timm and detectron2 (mixmask/export.py)."""
    from mixmask.checkpoint import resolve_weights
    from mixmask.export import export

    weights = resolve_weights(cfg.eval.checkpoint or Path(cfg.run.out_dir) / cfg.run.name)
    stored = weights.parent / "config.json"
    config = json.loads(stored.read_text())["config"] if stored.is_file() else None
    done = export(weights, config, Path(out) if out else weights.parent / "export", formats)  # -> export.json too
    where = Path(out) if out else weights.parent / "export"
    for name, f in done["files"].items():
        print(f"{where / name}  [{f['format']}]\n    {f['load']}" + (f"\n    absent: {', '.join(f['absent'])}" if f["absent"] else ""))
    for fmt, why in done["skipped"].items():
        print(f"skipped {fmt}: {why}")
    return 0


def cmd_show_batch(cfg: Config, out: str, samples: int, step: int) -> int:
    """A PNG grid of one real training batch of data.backend with mask.method's views (mixmask/visualize.py)."""
    from accelerate import Accelerator

    from mixmask.visualize import batch_grid, save_grid

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    root = data_root(cfg, accelerator)
    index = index_split(root, "train")
    loader = train_loader(cfg, accelerator, index, pretrain_aug(cfg))
    loader.set_epoch(0, step)
    batch = next(iter(loader))
    path = Path(out) if out else Path(cfg.run.out_dir) / cfg.run.name / "batch.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(path, batch_grid(batch, cfg.data.mean, cfg.data.std, max_samples=samples, token_grid=token_grid(cfg)))
    what = f"{cfg.mask.method}" if cfg.mask.enabled else "no masking"
    print(f"{path}: batch {step} of epoch 0, {cfg.data.backend} backend, {what}, {min(samples, batch.size)} samples")
    return 0


def cmd_report(runs: list[str], out: Path) -> int:
    """A markdown table and PNG plots of one or many run directories (mixmask/report.py)."""
    from mixmask.report import write_report

    path = write_report([Path(r) for r in runs], out)
    print(path.read_text().split("\n\n![")[0])
    print(f"written: {path}")
    return 0


def fan_out_cpu_processes(argv: list[str]) -> int | None:
    """Make `accelerate launch --cpu --num_processes N [--num_machines M --machine_rank R]` start its processes.

    accelerate 1.15's launcher starts ONE process for --cpu and leaves the fan-out to mpirun
    (``--mpirun_hostfile``); without it the run would silently train on one process. Here the requested
    N (all machines together), M and R are read from the launcher's command line and this machine's N / M
    processes are started with torch.distributed.run (gloo on the CPU; node R of M, rendezvous at the
    launcher's MASTER_ADDR:MASTER_PORT, i.e. --main_process_ip/--main_process_port). Returns the exit code,
    or None when there is nothing to do.
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "MASTER_ADDR" not in env:
        return None
    if any(k in env for k in ("LOCAL_RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        return None
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    opts = {"--num_processes": 1, "--num_machines": 1, "--machine_rank": 0}
    for i, arg in enumerate(parent):
        name, eq, value = arg.partition("=")
        if name in opts:
            opts[name] = int(value if eq else parent[i + 1])
    n, machines, rank = opts["--num_processes"], opts["--num_machines"], opts["--machine_rank"]
    if n <= 1 and machines <= 1:
        return None
    if n % machines:
        print(f"error: --num_processes {n} is not a multiple of --num_machines {machines}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={machines}", f"--node_rank={rank}",
           f"--nproc_per_node={n // machines}", f"--master_addr={env['MASTER_ADDR']}",
           f"--master_port={env.get('MASTER_PORT', '29500')}", str(Path(__file__).resolve()), *argv]
    return subprocess.call(cmd)


COMMANDS = ("train", "linear", "knn", "finetune", "semisup", "export", "show-batch", "report", "check", "write-beton")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = fan_out_cpu_processes(argv)
    if code is not None:
        return code
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    parser = argparse.ArgumentParser(prog=f"train.py {command}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if command == "report":
        parser.add_argument("runs", nargs="+", help="run directories (or folders of run directories)")
        parser.add_argument("--out", default="runs/report", help="where report.md and the plots go")
    else:
        parser.add_argument("--config", action="append", default=None, help="YAML file(s) of overrides, in order")
        parser.add_argument("overrides", nargs="*", help="section.field=value")
    if command == "write-beton":
        parser.add_argument("--overwrite", action="store_true", help="replace existing .beton files")
    if command == "export":
        parser.add_argument("--out", default="", help="output folder (default: <checkpoint>/export)")
        parser.add_argument("--formats", default="torchvision,timm,detectron2", help="comma-separated formats")
    if command == "show-batch":
        parser.add_argument("--out", default="", help="PNG path (default: <run.out_dir>/<run.name>/batch.png)")
        parser.add_argument("--samples", type=int, default=8, help="rows: the first samples of the batch")
        parser.add_argument("--step", type=int, default=0, help="which batch of epoch 0")
    args = parser.parse_args(argv)
    from mixmask.checkpoint import CheckpointWriteError
    from mixmask.export import ExportError
    from mixmask.report import ReportError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if command == "report":
            return cmd_report(args.runs, Path(args.out))
        cfg = load_config(args.config or default_configs(args.overrides), args.overrides)
        if command == "check":
            return cmd_check(cfg)
        if command == "write-beton":
            return cmd_write_beton(cfg, args.overwrite)
        if command == "export":
            return cmd_export(cfg, args.out, [f for f in args.formats.split(",") if f])
        if command == "show-batch":
            return cmd_show_batch(cfg, args.out, args.samples, args.step)
        if command == "train":
            cmd_train(cfg)
        elif command in ("finetune", "semisup"):
            cmd_finetune(cfg, semisup=command == "semisup")
        else:
            cmd_eval(cfg, command)
    # one "error:" line and exit 2, never a traceback; FloatingPointError: a non-finite loss (the last checkpoint
    # is the last good one); CheckpointWriteError: a checkpoint could not be written (a full disk...)
    except (ConfigError, DataError, FileNotFoundError, ExportError, ReportError, CheckpointWriteError,
            FloatingPointError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
