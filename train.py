"""mixmask: self-supervised pretraining (MoCo v2, SimCLR, BYOL, SimSiam, Barlow Twins with MixMask; CMAE on ViTs), and its evaluations.

    accelerate launch train.py [--config FILE ...] [section.field=value ...]        pretrain
    accelerate launch train.py linear [--config FILE ...] [eval.checkpoint=PATH ...] linear probe
    accelerate launch train.py knn [--config FILE ...] [eval.checkpoint=PATH ...]    kNN top-1
    python train.py check [--config FILE ...] [data.root=DIR]    list the images the backend cannot decode
    python train.py write-beton [--overwrite] [--config FILE ...] [data.ffcv_*=...]   ImageFolder -> .beton

Without --config, configs/demo.yaml and configs/demo_<framework>.yaml are used (the embedded demo
dataset; the framework from a model.framework=... override, else moco_v2). Plain ``python train.py``
works too (one process). Outputs go to <run.out_dir>/<run.name>/ (see README.md).
"""

from __future__ import annotations

import argparse
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
from loaders.torchvision_backend import (
    AugParams,
    TorchvisionEvalLoader,
    TorchvisionTrainLoader,
    eval_transform,
    probe_train_transform,
)
from mixmask.config import Config, ConfigError, load_config, parse_cli_overrides
from mixmask.evaluation import knn_top1, linear_probe

CONFIGS = Path(__file__).resolve().parent / "configs"
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("mixmask")


def derived(cfg: Config, world: int, steps_per_epoch: int) -> dict:
    """Every value computed from the config, in one place (logged and stored in the summary)."""
    global_batch = cfg.data.batch_size * world * cfg.optim.grad_accum
    return {
        "world_size": world,
        "global_batch": global_batch,
        "lr": cfg.optim.lr * global_batch / 256,  # linear scaling rule
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": round(cfg.optim.warmup_epochs * steps_per_epoch),
    }


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


def build_model(cfg: Config, world: int):
    """The model.framework's model from its config section (mixmask/frameworks FRAMEWORKS)."""
    import torch.distributed as dist

    from mixmask.frameworks import FRAMEWORKS

    from mixmask.models import BackboneSpec

    m = cfg.model
    spec = BackboneSpec(m.arch, m.stem, cfg.data.image_size, m.patch_size, m.vit_depth)
    return FRAMEWORKS[m.framework](cfg.framework, arch=spec, seed=cfg.run.seed,
                                   group=dist.group.WORLD if world > 1 else None)


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


def eval_loader(cfg: Config, accelerator, root: Path, split: str, transform=None, shuffle=False):
    return TorchvisionEvalLoader(
        index_split(root, split),
        transform or eval_transform(cfg.data.image_size, cfg.data.eval_resize),
        make_stage(cfg, accelerator, masking=False),
        batch_size=cfg.data.batch_size,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        workers=cfg.data.workers,
        seed=cfg.run.seed,
        shuffle=shuffle,
        device=accelerator.device,
    )


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


def train_loader(cfg: Config, accelerator, index, aug: AugParams, boxes=None):
    """The training-view loader of data.backend (eval loaders are the torchvision ones for every backend);
    boxes: ContrastiveCrop's shared box table (mixmask/crops.py), or None."""
    stage = make_stage(cfg, accelerator, masking=True)
    if cfg.data.backend == "ffcv":
        from loaders.ffcv_backend import FfcvTrainLoader, ensure_beton

        with accelerator.main_process_first():  # the .beton is written once, by the main process
            beton = ensure_beton(index.root.parent, "train", beton_dir(cfg, index.root.parent),
                                 **beton_writer_args(cfg, cfg.run.progress and accelerator.is_main_process))
        return FfcvTrainLoader(beton, aug, stage, cfg.data.batch_size, accelerator.process_index,
                               accelerator.num_processes, cfg.data.workers, cfg.run.seed, accelerator.device,
                               cfg.data.ffcv_os_cache, cfg.data.ffcv_order, batches_ahead=cfg.data.prefetch,
                               boxes=boxes)
    args = (index, aug, stage, cfg.data.batch_size, accelerator.process_index, accelerator.num_processes,
            cfg.data.workers, cfg.data.prefetch, cfg.run.seed, accelerator.device)
    if cfg.data.backend == "dali":
        from loaders.dali_backend import DaliTrainLoader

        return DaliTrainLoader(*args, hw_decoder_load=cfg.data.hw_decoder_load, boxes=boxes)
    return TorchvisionTrainLoader(*args, boxes=boxes)


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


def cmd_train(cfg: Config) -> dict:
    from accelerate.utils import set_seed

    from mixmask.checkpoint import latest_checkpoint
    from mixmask.engine import TrainState, fit

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
    aug = AugParams(
        cfg.data.image_size, cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.flip_p, cfg.data.jitter,
        cfg.data.jitter_p, cfg.data.gray_p, cfg.data.blur_p, cfg.data.blur_sigma, cfg.data.solarize_p,
        crop_alpha=cfg.ccrop.alpha if crop else 0.0,
    )
    loader = train_loader(cfg, accelerator, train_index, aug, boxes=crop.table if crop else None)
    d = derived(cfg, accelerator.num_processes, len(loader) // cfg.optim.grad_accum)
    model = build_model(cfg, accelerator.num_processes)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, d["lr"])
    model, optimizer = accelerator.prepare(model, optimizer)
    saliency = getattr(loader.stage.mixer, "saliency", None)
    if saliency is not None and saliency.wants_encoder:  # saliency.source=encoder: the model's own target map
        saliency.feature_map = accelerator.unwrap_model(model).target_feature_map
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if crop is not None:  # the boxes are saved in every checkpoint and restored in place on resume
        accelerator.register_for_checkpointing(crop)
    resolved = {"config": cfg.to_dict(), "derived": d, "git_sha": git_sha()}
    ckpt = latest_checkpoint(run_dir) if cfg.run.resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        log.info("resumed from %s at epoch %d, step %d", ckpt, state.epoch, state.step)
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
    knn_init = state.monitors["knn_top1_init"]
    facts = fit(
        accelerator, model, optimizer, loader, state, run_dir=run_dir, config=resolved,
        epochs=cfg.optim.epochs, base_lr=d["lr"], warmup_steps=d["warmup_steps"], grad_accum=cfg.optim.grad_accum,
        checkpoint_every=cfg.run.checkpoint_every, keep_checkpoints=cfg.run.keep_checkpoints,
        max_steps=cfg.run.max_steps, log_every=cfg.run.log_every, monitor=monitor,
        monitor_every=cfg.run.knn_every, progress=cfg.run.progress,
        before_epoch=box_updater(cfg, crop, model, accelerator, root) if crop else None,
    )
    if facts["interrupted"]:
        if accelerator.is_main_process:
            print(f"interrupted at step {state.step}: checkpoint written in {run_dir}; "
                  "run the same command again to resume", file=sys.stderr)
        accelerator.end_training()
        raise SystemExit(128 + facts["interrupted"])
    knn_final = monitor()["knn_top1"]
    accelerator.log({"knn_top1": knn_final}, step=state.step)
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
    """The model of ``eval.checkpoint`` (default: the run's latest), built from its stored config."""
    from safetensors.torch import load_file

    from mixmask.checkpoint import resolve_weights
    from mixmask.config import apply_overrides
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
    model = build_model(cfg, 1)
    model.load_state_dict(load_file(str(weights)))
    return model.to(accelerator.device), weights


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
        train = eval_loader(
            cfg, accelerator, root, "train", probe_train_transform(cfg.data.image_size) if e.augment else None,
            shuffle=e.augment,
        )
        val = eval_loader(cfg, accelerator, root, "val")
        result = linear_probe(
            features, model.width, train, val, len(train.classes), e.epochs, e.lr, e.weight_decay, e.milestones,
            e.augment, e.batch_size, accelerator.device, accelerator.gather, train.set_epoch, progress, cfg.run.seed,
        )
        result.update(epochs=e.epochs, lr=e.lr, augment=e.augment)
    result["checkpoint"] = str(weights)
    if accelerator.is_main_process:
        out = weights.parent / f"{kind}.json"
        out.write_text(json.dumps(result, indent=2))
        print(f"{kind}: top-1 {result.get('top1', result.get('knn_top1')):.2f}%  ({out})")
    return result


def fan_out_cpu_processes(argv: list[str]) -> int | None:
    """Make `accelerate launch --cpu --num_processes N` (N > 1) start N processes.

    accelerate 1.15's launcher starts ONE process for --cpu and leaves the fan-out to mpirun
    (``--mpirun_hostfile``); without it the run would silently train on one process. Here the
    requested N is read from the launcher's command line and the processes are started with
    torch.distributed.run (gloo on the CPU). Returns the exit code, or None when nothing to do.
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
    n = 1
    for i, arg in enumerate(parent):
        if arg == "--num_processes" and i + 1 < len(parent):
            n = int(parent[i + 1])
        elif arg.startswith("--num_processes="):
            n = int(arg.split("=", 1)[1])
    if n <= 1:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
           f"--master_addr={env['MASTER_ADDR']}", f"--master_port={env.get('MASTER_PORT', '29500')}",
           str(Path(__file__).resolve()), *argv]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = fan_out_cpu_processes(argv)
    if code is not None:
        return code
    command = argv.pop(0) if argv and argv[0] in ("train", "linear", "knn", "check", "write-beton") else "train"
    parser = argparse.ArgumentParser(prog=f"train.py {command}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None, help="YAML file(s) of overrides, in order")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    if command == "write-beton":
        parser.add_argument("--overwrite", action="store_true", help="replace existing .beton files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config or default_configs(args.overrides), args.overrides)
        if command == "check":
            return cmd_check(cfg)
        if command == "write-beton":
            return cmd_write_beton(cfg, args.overwrite)
        if command == "train":
            cmd_train(cfg)
        else:
            cmd_eval(cfg, command)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
