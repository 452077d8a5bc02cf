"""Config loading: defaults, YAML files, CLI overrides and the errors that name the key."""

from pathlib import Path

import pytest

from mixmask.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("optim:\n  lr: 0.1\nmask:\n  grid: 4\n")
    cfg = load_config([f], ["optim.lr=0.2", "mask.enabled=false", "data.crop_scale=[0.3, 0.9]"])
    assert cfg.optim.lr == 0.2 and cfg.mask.grid == 4 and cfg.mask.enabled is False
    assert cfg.data.crop_scale == (0.3, 0.9)
    assert cfg.model.queue == Config().model.queue


def test_int_accepted_for_float():
    assert load_config([], ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("foo.bar=1", "foo"),
        ("optim.epochs=1.5", "optim.epochs"),
        ("mask.enabled=yes please", "mask.enabled"),
        ("mask.kind=circles", "mask.kind"),
        ("data.crop_scale=[0.2]", "data.crop_scale"),
        ("data.batch_size=1", "data.batch_size"),
        ("mask.ratio=1.0", "mask.ratio"),
        ("optim.lr", "optim.lr"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config([], [override])


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  archh: resnet50\n")
    with pytest.raises(ConfigError, match=r"model\.archh"):
        load_config([f])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["/nonexistent.yaml"])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_recipes_load(name):
    load_config([CONFIGS / name])


def test_plain_moco_recipe_only_turns_masking_off():
    mix = load_config([CONFIGS / "imagenet_mocov2_mixmask_200ep.yaml"])
    plain = load_config([CONFIGS / "imagenet_mocov2_mixmask_200ep.yaml", CONFIGS / "imagenet_mocov2_200ep.yaml"])
    assert mix.mask.enabled and not plain.mask.enabled
    assert (mix.model, mix.optim, mix.data) == (plain.model, plain.optim, plain.data)
