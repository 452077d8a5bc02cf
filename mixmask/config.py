"""Typed configuration: one source of defaults, YAML files and CLI overrides on top.

Every key lives in one dataclass section below with its unit or reason. ``configs/*.yaml`` only
override these defaults; the command line overrides with ``section.field=value`` (the value is
parsed as YAML, so ``optim.lr=0.06``, ``mask.enabled=false``, ``data.crop_scale=[0.2,1.0]``).
Unknown sections or keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mixmask.crops import ContrastiveCropConfig
from mixmask.frameworks import FRAMEWORKS
from mixmask.frameworks.barlow_twins import BarlowTwinsConfig
from mixmask.frameworks.byol import BYOLConfig
from mixmask.frameworks.cmae import CMAEConfig
from mixmask.frameworks.moco_v2 import MoCoV2Config
from mixmask.frameworks.simclr import SimCLRConfig
from mixmask.frameworks.simsiam import SimSiamConfig
from mixmask.frameworks.supervised import FinetuneConfig
from mixmask.mixing import MIXERS
from mixmask.models import is_vit
from mixmask.mixing.mscn import MSCNConfig
from mixmask.mixing.saliency import SaliencyConfig
from mixmask.mixing.unmix import UnMixConfig

MIXING_SECTIONS = ("unmix", "mscn", "saliency")  # the mask section is shared: enabled, method, route


class ConfigError(ValueError):
    """A bad configuration: the message names the offending key."""


@dataclass
class DataConfig:
    root: str = ""  # ImageFolder root (root/train/<class>/*, root/val/<class>/*); "" = embedded demo set
    backend: Literal["torchvision", "dali", "ffcv"] = "torchvision"  # input pipeline for the training views
    image_size: int = 64  # side of both training views after RandomResizedCrop (px); with size_start: the final side
    size_start: int = 0  # progressive resolution (FFCV): view side (px) of the first epochs; 0 = off, every epoch at image_size
    size_ramp: tuple[float, float] = (0.0, 0.0)  # epochs (0-based) over which the side grows linearly size_start -> image_size
    size_step: int = 32  # the growing side is rounded down to a multiple of this (px; FFCV rounds to 32)
    eval_size: int = 0  # evaluation centre-crop side (px; kNN, probes, fine-tuning's val); 0 = image_size
    eval_resize: int = 0  # eval: resize shorter side to this before the centre crop; 0 = eval side * 8/7
    batch_size: int = 128  # per process; global batch = batch_size * processes * grad_accum
    workers: int = 2  # per training process: DataLoader worker processes (torchvision), DALI threads (dali)
    prefetch: int = 4  # batches kept ready: per DataLoader worker (torchvision), DALI queue depth, FFCV batches_ahead
    timeout: float = 300.0  # seconds without a batch before the loader is declared stuck (0 = never)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (MoCo v2)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)  # RandomResizedCrop aspect range
    flip_p: float = 0.5  # horizontal flip probability
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of applying the colour jitter
    gray_p: float = 0.2  # probability of grayscale
    blur_p: float = 0.5  # probability of Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur radius range in px (MoCo v2 at 224 px)
    solarize_p: float = 0.0  # probability of solarisation (BYOL-style; 0 in MoCo v2)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # normalisation mean (ImageNet, 0-1 units)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # normalisation std (ImageNet, 0-1 units)
    hw_decoder_load: float = 0.65  # dali on a GPU: share of JPEGs sent to the hardware decoder (A100/H100)
    beton_dir: str = ""  # ffcv: where train.beton / val.beton live (written on first use); "" = <root>/ffcv
    ffcv_write_mode: Literal["raw", "jpg", "proportion"] = "jpg"  # ffcv writer: pixels, JPEG, or a JPEG share
    ffcv_max_resolution: int = 0  # ffcv writer: longest side stored (px); 0 = as is
    ffcv_jpeg_quality: int = 90  # ffcv writer: JPEG quality of re-encoded images
    ffcv_compress_probability: float = 0.5  # ffcv writer, proportion mode: share of images stored as JPEG
    ffcv_os_cache: bool = True  # ffcv: read through the page cache (False: FFCV's own reader, big datasets)
    ffcv_order: Literal["random", "quasi_random"] = "random"  # ffcv: per-epoch sharded permutation, or FFCV's quasi-random (1 process)
    channels_last: bool = True  # NHWC memory for the views (faster convolutions, free from NHWC uint8)


@dataclass
class MaskConfig:
    enabled: bool = True  # False = the plain framework (no mixed view, no extra forward)
    method: Literal["mixmask", "unmix", "unmix_mixmask", "mscn", "saliency", "saliency_mixmask"] = "mixmask"  # mixmask/mixing MIXERS; its options: the sections it names
    kind: Literal["block", "discrete"] = "block"  # grid-mask generator (docs/methods.md §2)
    grid: int = 8  # g: the mask is g x g cells, upsampled nearest to the view size
    ratio: float = 0.5  # r: target fraction of cells filled from the partner image
    per_sample: bool = False  # False = one mask per batch (the paper), True = one per sample
    partner: Literal["auto", "reverse", "roll", "random"] = "auto"  # auto: reverse for even N, roll by one for odd N; random: drawn per batch
    route: Literal["auto", "numba", "torch"] = "auto"  # samplers + kernels: our Numba kernels, or their numpy references and torch


@dataclass
class ModelConfig:
    framework: Literal["moco_v2", "simclr", "byol", "simsiam", "barlow_twins", "cmae"] = "moco_v2"  # its options: the section of that name
    arch: Literal["resnet10", "resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small", "vit_base"] = "resnet18"
    stem: Literal["imagenet", "small"] = "imagenet"  # ResNets: small = 3x3 stride-1 conv, no max-pool (<= 64 px)
    patch_size: int = 16  # ViTs: patch side (px); must divide data.image_size
    vit_depth: int = 0  # ViTs: transformer blocks (0 = the architecture's 12)
    batch_views: bool = False  # one forward of an encoder on all its views (x1, x2, mixed) with BatchNorm statistics per view: the same results as a forward per view, fewer and larger kernel calls (mixmask/models/norm.py); not cmae
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"  # torch.compile mode of the framework's networks, in place (frameworks/base.py compile_networks); reduce-overhead = CUDA graphs
    compile_dynamic: bool = False  # compile with dynamic shapes; false = one compile per image size (progressive resolution: once per size)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # torch.compile backend; aot_eager/eager: debugging and fast tests (mode default only)


@dataclass
class OptimConfig:
    epochs: int = 200
    optimizer: Literal["sgd", "lars", "adamw"] = "sgd"  # mixmask/optim.py OPTIMIZERS; lars: timm's LARS (SimCLR, BYOL, Barlow Twins recipes); adamw: ViTs (MAE)
    lr: float = 0.03  # base learning rate for a global batch of 256 (linearly scaled)
    momentum: float = 0.9  # SGD/LARS momentum
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (MAE's)
    weight_decay: float = 1e-4
    exclude_bias_bn: bool = False  # biases and norm weights without weight decay (and, with LARS, adaptation)
    lars_trust: float = 0.001  # LARS trust coefficient eta
    warmup_epochs: float = 0.0  # linear warm-up before the cosine decay
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class RunConfig:
    name: str = "demo"  # run directory: <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto = what `accelerate launch` says
    checkpoint_every: int = 200  # optimizer steps between checkpoints (0 = only at epoch ends)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = True  # continue from the run directory's last checkpoint if there is one
    resize: Literal["keep_global_batch", "rescale_lr"] = "keep_global_batch"  # resuming with other processes/data.batch_size/grad_accum: keep the checkpoint's global batch (grad_accum adapts) or take the new one (lr rescaled); README "Reliability and scale"
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs); for smoke tests
    log_every: int = 10  # optimizer steps between scalar logs
    knn_every: int = 1  # epochs between kNN monitors (0 = only at the end)
    knn_k: int = 200  # kNN monitor neighbours
    knn_t: float = 0.1  # kNN monitor temperature
    progress: bool = True  # progress bar on the main process
    show_every: int = 500  # batches between grids of the training batch in TensorBoard (0 = none)


@dataclass
class EvalConfig:
    checkpoint: str = ""  # checkpoint directory or model.safetensors; "" = the run's last checkpoint
    epochs: int = 100  # linear probe epochs (MoCo v2 protocol, docs/methods.md §6)
    lr: float = 30.0  # linear probe SGD learning rate
    batch_size: int = 256
    weight_decay: float = 0.0
    milestones: tuple[float, ...] = (0.6, 0.8)  # lr x0.1 at these fractions of the epochs (60/80 of 100)
    augment: bool = True  # RandomResizedCrop + flip per epoch; False = cache centre-crop features once


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # one section per framework (model.framework picks one; setting a key of another is an error)
    moco_v2: MoCoV2Config = field(default_factory=MoCoV2Config)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    barlow_twins: BarlowTwinsConfig = field(default_factory=BarlowTwinsConfig)
    cmae: CMAEConfig = field(default_factory=CMAEConfig)
    # one section per mixing method's own options (mask.method picks the sections; see MIXERS[...].sections)
    unmix: UnMixConfig = field(default_factory=UnMixConfig)
    mscn: MSCNConfig = field(default_factory=MSCNConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    # ContrastiveCrop (mixmask/crops.py): the input pipeline's crops follow the model's boxes, any framework
    ccrop: ContrastiveCropConfig = field(default_factory=ContrastiveCropConfig)
    # `train.py finetune` / `semisup`: supervised fine-tuning of a pretrained backbone (frameworks/supervised.py)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def framework(self) -> Any:
        """The section of the selected framework."""
        return getattr(self, self.model.framework)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _show(value: Any) -> str:
    """repr(value), or a stand-in where Python refuses to print it (an int of more than 4300 digits)."""
    try:
        return repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to print>"


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {_show(value)} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {_show(value)} does not match {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_check_value(key, v, a) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        try:
            repr(value)
        except ValueError:  # over sys.get_int_max_str_digits() digits: it could not be printed or stored
            raise ConfigError(f"{key}: a {value.bit_length()}-bit integer is too large to write out") from None
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads exponents without a dot (5e-4) as strings
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond the largest float
            number = math.inf
        if not math.isfinite(number):  # nan and inf fail no range check written as `x < 0` and mean nothing
            raise ConfigError(f"{key}: expected a finite number, got {_show(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a programming error


def _section_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _name(*parts: Any) -> str:
    """'section' or 'section.key' as the file or command line spelled it, quoted on one line."""
    return repr(".".join(p if isinstance(p, str) else _show(p) for p in parts))


def _yaml_problem(e: Exception) -> str:
    """What yaml.safe_load raised, on one line. Its YAMLErrors span several (the problem, then the place);
    its constructors raise others on a bad tagged scalar (!!int abc: ValueError, !!bool maybe: KeyError,
    2020-13-45: ValueError, an int of over 4300 digits: ValueError) and RecursionError on deep nesting."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if not isinstance(e, yaml.YAMLError):
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> set[str]:
    """Apply a nested ``{section: {field: value}}`` mapping onto ``cfg`` in place; return the keys set."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(overrides).__name__}")
    sections = {f.name for f in dataclasses.fields(cfg)}
    done = set()
    for name, values in overrides.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {_name(name)} (known: {', '.join(sorted(sections))})")
        section = getattr(cfg, name)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {_name(name)} must be a mapping")
        hints = _section_types(section)
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"{source}: unknown key {_name(name, key)} (known: {', '.join(sorted(hints))})"
                )
            setattr(section, key, _check_value(f"{name}.{key}", value, hints[key]))
            done.add(f"{name}.{key}")
    return done


def parse_cli_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["optim.lr=0.1", "mask.enabled=false"]`` -> ``{"optim": {"lr": 0.1}, "mask": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key.count(".") != 1 or not all(key.split(".")):
            raise ConfigError(f"override {item!r}: expected section.field=value")
        section, name = key.split(".")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except Exception as e:  # noqa: BLE001 - whatever safe_load raises, the text is not readable (_yaml_problem)
            raise ConfigError(f"override {item!r}: value is not valid YAML ({_yaml_problem(e)})") from None
        out.setdefault(section, {})[name] = value
    return out


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults, then each YAML file in order, then ``section.field=value`` overrides."""
    cfg = Config()
    keys: set[str] = set()
    for path in files:
        path = Path(path)
        try:
            text = path.read_text() if path.is_file() else None
        except (OSError, UnicodeDecodeError) as e:  # a name too long, no permission, not UTF-8
            raise ConfigError(f"{path}: cannot read it ({str(e).splitlines()[0]})") from None
        if text is None:
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(text) or {}
        except Exception as e:  # noqa: BLE001 - whatever safe_load raises, the text is not readable (_yaml_problem)
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
        keys |= apply_overrides(cfg, data, str(path))
    keys |= apply_overrides(cfg, parse_cli_overrides(list(overrides)), "command line")
    validate(cfg, keys)
    return cfg


def validate(cfg: Config, keys: set[str] = frozenset()) -> None:
    """Range checks that types alone cannot express; ``keys`` (section.field set by files or the command
    line) must not belong to the section of a framework that model.framework does not select."""
    mixer = MIXERS[cfg.mask.method]
    for key in sorted(keys):
        section = key.split(".")[0]
        if section in FRAMEWORKS and section != cfg.model.framework:
            raise ConfigError(f"{key} is set, but model.framework is {cfg.model.framework!r}: "
                              f"remove it or select model.framework={section}")
        if section in MIXING_SECTIONS and not (cfg.mask.enabled and section in mixer.sections):
            users = sorted(m for m, cls in MIXERS.items() if section in cls.sections)
            raise ConfigError(f"{key} is set, but mask.method={cfg.mask.method!r}"
                              f"{'' if cfg.mask.enabled else ' is off (mask.enabled=false)'} does not read the "
                              f"{section} section: remove it or select mask.method from {users}")
    for key in sorted(k for k in keys if k.startswith("ccrop.") and k != "ccrop.enabled"):
        if not cfg.ccrop.enabled:
            raise ConfigError(f"{key} is set, but ccrop.enabled=false: remove it or set ccrop.enabled=true")
    if cfg.mask.enabled and "saliency" in mixer.sections and cfg.saliency.hard_negative:
        if not FRAMEWORKS[cfg.model.framework].hard_negatives:
            have = sorted(n for n, cls in FRAMEWORKS.items() if cls.hard_negatives)
            raise ConfigError(f"saliency.hard_negative=true with mask.method={cfg.mask.method}: model.framework="
                              f"{cfg.model.framework!r} has no negatives to add it to; set saliency.hard_negative=false "
                              f"or select model.framework from {have}")
    _check_architecture(cfg, keys)
    _check_resolution(cfg)
    checks = [
        (cfg.data.image_size >= 8, "data.image_size must be >= 8"),
        (cfg.data.batch_size >= 2, "data.batch_size must be >= 2 (MixMask needs a partner image)"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (cfg.data.timeout >= 0, "data.timeout must be >= 0 (0 = no watchdog)"),
        (cfg.data.backend != "dali" or cfg.data.workers >= 1, "data.workers (DALI threads) must be >= 1 for dali"),
        (0 <= cfg.data.hw_decoder_load <= 1, "data.hw_decoder_load must be in [0, 1]"),
        (cfg.data.ffcv_max_resolution >= 0, "data.ffcv_max_resolution must be >= 0"),
        (1 <= cfg.data.ffcv_jpeg_quality <= 100, "data.ffcv_jpeg_quality must be in [1, 100]"),
        (0 <= cfg.data.ffcv_compress_probability <= 1, "data.ffcv_compress_probability must be in [0, 1]"),
        (0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1, "data.crop_scale must satisfy 0 < lo <= hi <= 1"),
        (0 < cfg.data.crop_ratio[0] <= cfg.data.crop_ratio[1], "data.crop_ratio must satisfy 0 < lo <= hi"),
        (all(s > 0 for s in cfg.data.std), "data.std must be positive"),
        (cfg.mask.grid >= 2, "mask.grid must be >= 2"),
        (0 < cfg.mask.ratio < 1, "mask.ratio must be in (0, 1)"),
        *((False, f"{cfg.model.framework}.{problem}") for problem in cfg.framework.problems()),
        *((False, f"{section}.{problem}") for section in MIXING_SECTIONS if section in mixer.sections
          for problem in getattr(cfg, section).problems()),
        *((False, f"ccrop.{problem}") for problem in (cfg.ccrop.problems() if cfg.ccrop.enabled else ())),
        (cfg.optim.epochs >= 1, "optim.epochs must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.grad_accum >= 1, "optim.grad_accum must be >= 1"),
        (cfg.run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0"),
        (cfg.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1"),
        (cfg.eval.epochs >= 1, "eval.epochs must be >= 1"),
        *((False, f"finetune.{problem}") for problem in cfg.finetune.problems()),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_resolution(cfg: Config) -> None:
    """Progressive resolution (data.size_start, size_ramp, size_step; mixmask/resolution.py) and the evaluation
    side (data.eval_size): the schedule, the ViTs that cannot follow it, and the mixers' grid cells, which keep
    their pixel size (data.image_size / grid) at every view side: size_start, size_step and image_size must be
    multiples of the cell, so every side of the schedule is one."""
    d, arch = cfg.data, cfg.model.arch
    if d.eval_size and d.eval_size < 8:
        raise ConfigError(f"data.eval_size={d.eval_size} must be 0 (= data.image_size) or >= 8")
    if d.size_step < 1:
        raise ConfigError(f"data.size_step={d.size_step} must be >= 1")
    if not 0 <= d.size_ramp[0] <= d.size_ramp[1]:
        raise ConfigError(f"data.size_ramp={list(d.size_ramp)} must be [start, end] epochs with 0 <= start <= end")
    if is_vit(arch) and d.eval_size not in (0, d.image_size):
        raise ConfigError(f"data.eval_size={d.eval_size} with model.arch={arch}: a ViT's positional embedding fixes "
                          f"its input side at data.image_size={d.image_size}; set data.eval_size=0")
    if not d.size_start or d.image_size < 8:  # data.image_size >= 8 is checked with the others
        return
    if is_vit(arch):
        raise ConfigError(f"data.size_start={d.size_start} with model.arch={arch}: progressive resolution is for "
                          f"ConvNets (a ViT's patch grid and positional embedding are fixed at data.image_size); "
                          f"set data.size_start=0")
    if not 8 <= d.size_start <= d.image_size:
        raise ConfigError(f"data.size_start={d.size_start} must be 0 (off) or in [8, data.image_size={d.image_size}]")
    if d.size_start % d.size_step:
        raise ConfigError(f"data.size_start={d.size_start} is not a multiple of data.size_step={d.size_step}")
    if not cfg.mask.enabled:
        return
    for key in MIXERS[cfg.mask.method].grids:  # e.g. mask.grid, mscn.grid
        section, name = key.split(".")
        g = getattr(getattr(cfg, section), name)
        if g < 1:  # its own range check names it
            continue
        if d.image_size % g:
            raise ConfigError(f"{key}={g} does not divide data.image_size={d.image_size}: with progressive resolution "
                              f"(data.size_start) the grid's cell keeps its pixel size, data.image_size / {key}")
        # MixMask's block generator places nothing on fewer than 3 x 3 cells (docs/methods.md §2), discrete needs 2
        cell, least = d.image_size // g, (3 if cfg.mask.kind == "block" else 2) if key == "mask.grid" else 1
        for what, v in (("data.size_start", d.size_start), ("data.size_step", d.size_step)):
            if v % cell:
                raise ConfigError(f"{what}={v} is not a multiple of the {cell}-px cell of {key}={g} at data.image_size="
                                  f"{d.image_size}: every view side must be a whole number of cells")
        if d.size_start < least * cell:
            raise ConfigError(f"data.size_start={d.size_start} leaves {d.size_start // cell} cell(s) of {cell} px a side "
                              f"for {key}={g}; mask.kind={cfg.mask.kind} needs >= {least}: raise data.size_start")


def _check_architecture(cfg: Config, keys: set[str]) -> None:
    """ViT-only and ConvNet-only options, and frameworks that need one family."""
    m, framework = cfg.model, FRAMEWORKS[cfg.model.framework]
    vit = is_vit(m.arch)
    if vit:
        if "model.stem" in keys and m.stem != "imagenet":
            raise ConfigError(f"model.stem={m.stem} is a ResNet option; model.arch={m.arch} is a ViT: remove model.stem")
        if m.patch_size < 1 or cfg.data.image_size % m.patch_size:
            raise ConfigError(f"model.patch_size={m.patch_size} does not divide data.image_size={cfg.data.image_size}")
        if m.vit_depth < 0:
            raise ConfigError("model.vit_depth must be >= 0")
        if cfg.ccrop.size not in (0, cfg.data.image_size):
            raise ConfigError(f"ccrop.size={cfg.ccrop.size}: a ViT's feature map needs its own image size "
                              f"(data.image_size={cfg.data.image_size}); remove ccrop.size")
    else:
        for key in ("model.patch_size", "model.vit_depth"):
            if key in keys:
                raise ConfigError(f"{key} is a ViT option; model.arch={m.arch} is a ResNet: remove it")
    if m.batch_views and not framework.views_batchable:
        raise ConfigError(f"model.batch_views=true: model.framework={m.framework} encodes one view per encoder, "
                          "there is nothing to batch; set model.batch_views=false")
    if m.compile == "none":
        for key in ("model.compile_dynamic", "model.compile_backend"):
            if key in keys:
                raise ConfigError(f"{key} is set, but model.compile=none: remove it or set model.compile=default")
    elif m.compile_backend != "inductor" and m.compile != "default":
        raise ConfigError(f"model.compile={m.compile} is an inductor mode; model.compile_backend={m.compile_backend} "
                          "takes model.compile=default only")
    if framework.vit_only and not vit:
        raise ConfigError(f"model.framework={m.framework} needs a ViT: set model.arch to vit_tiny, vit_small or vit_base")
    if framework.masks_tokens and cfg.mask.enabled:
        raise ConfigError(f"mask.enabled=true with model.framework={m.framework}: it masks tokens "
                          f"({m.framework}.mask_ratio), not pixels; set mask.enabled=false")
