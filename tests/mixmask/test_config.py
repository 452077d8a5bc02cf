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
    assert cfg.moco_v2.queue == Config().moco_v2.queue


def test_int_accepted_for_float():
    assert load_config([], ["optim.lr=1"]).optim.lr == 1.0


def test_exponent_without_a_dot_is_a_number():
    """YAML 1.1 reads 5e-4 as a string; a float key takes it as the number it spells."""
    assert load_config([], ["optim.weight_decay=5e-4"]).optim.weight_decay == 5e-4
    with pytest.raises(ConfigError, match=r"optim\.weight_decay: expected a number"):
        load_config([], ["optim.weight_decay=five"])


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


def test_unknown_framework_lists_the_choices():
    with pytest.raises(ConfigError, match=r"model\.framework: 'mocov3' is not one of .*'simclr'.*'barlow_twins'"):
        load_config([], ["model.framework=mocov3"])


@pytest.mark.parametrize("where", ["cli", "yaml"])
def test_key_of_an_unselected_framework_names_itself(tmp_path, where):
    if where == "cli":
        args = ([], ["model.framework=byol", "simclr.temperature=0.3"])
    else:
        f = tmp_path / "r.yaml"
        f.write_text("model:\n  framework: byol\nsimclr:\n  temperature: 0.3\n")
        args = ([f], [])
    with pytest.raises(ConfigError, match=r"simclr\.temperature is set, but model\.framework is 'byol'"):
        load_config(*args)


def test_selected_framework_section_is_used():
    cfg = load_config([], ["model.framework=simclr", "simclr.temperature=0.3"])
    assert cfg.framework is cfg.simclr and cfg.simclr.temperature == 0.3


def test_framework_section_range_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"byol\.momentum must be in \[0, 1\)"):
        load_config([], ["model.framework=byol", "byol.momentum=1.0"])


@pytest.mark.parametrize("framework", ["moco_v2", "simclr", "byol", "simsiam", "barlow_twins"])
def test_each_framework_has_a_demo_overlay_and_an_imagenet_recipe(framework):
    demo = load_config([CONFIGS / "demo.yaml", CONFIGS / f"demo_{framework}.yaml"])
    assert demo.model.framework == framework and demo.data.root == ""
    imagenet = load_config(sorted(CONFIGS.glob(f"imagenet_{framework.replace('moco_v2', 'mocov2')}_mixmask_200ep.yaml")))
    assert imagenet.model.framework == framework and imagenet.model.arch == "resnet50" and imagenet.optim.epochs == 200


def test_every_field_round_trips_through_its_stored_form():
    """A run stores its resolved config (config.json, config.yaml); every field must load back as it was
    (a field type the checker cannot read would make every stored config unreadable)."""
    import json

    from mixmask.config import Config, apply_overrides

    stored = json.loads(json.dumps(Config().to_dict()))  # tuples become lists, as in config.json
    cfg = Config()
    apply_overrides(cfg, stored, "config.json")
    assert cfg == Config()
