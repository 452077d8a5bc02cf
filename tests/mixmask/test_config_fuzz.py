"""Property-based fuzzing of the config loader (hypothesis): whatever a YAML file or a ``section.key=value``
override holds, load_config either loads it (and the config holds what was asked) or raises ONE ConfigError
line that names the offending key (or section, or the override text). Any other exception is a failure.

The strategies walk every section and key of mixmask.config.Config through its type hints, as _check_value
does, on top of a valid choice of model.framework / model.arch / mask.enabled / mask.method (validation
depends on them). The examples are fixed (tests/conftest.py's "ci" profile: derandomize, 200 a test);
HYPOTHESIS_PROFILE=dev searches at random.
"""

from __future__ import annotations

import itertools
import math
import re
import typing
from typing import Any, Literal

import pytest
import yaml

pytest.importorskip("hypothesis", reason="hypothesis not installed (pip install '.[dev]')")
from hypothesis import event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.control import currently_in_test_context  # noqa: E402

from mixmask.config import Config, ConfigError, load_config  # noqa: E402
from mixmask.frameworks import FRAMEWORKS  # noqa: E402
from mixmask.mixing import MIXERS  # noqa: E402

SECTION_TYPES = typing.get_type_hints(Config)
KEYS = [(s, k, tp) for s, cls in SECTION_TYPES.items() for k, tp in typing.get_type_hints(cls).items()]
TYPES = {f"{s}.{k}": tp for s, k, tp in KEYS}
COMBO = ("model.framework", "model.arch", "mask.enabled", "mask.method")  # the keys validation branches on
VITS = ("vit_tiny", "vit_small")


# ---------------------------------------------------------------------------------------------- oracle


def convert(value: Any, tp: Any) -> tuple[bool, Any]:
    """(True, what the config should hold) if ``value`` has the annotated type ``tp``, else (False, None).
    From the types alone: a float key takes an int or a string that float() reads; it must be finite."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return (isinstance(value, str) and value in typing.get_args(tp)), value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            return False, None
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(value) != len(args):
            return False, None
        parts = [convert(v, a) for v, a in zip(value, args)]
        return all(ok for ok, _ in parts), tuple(v for _, v in parts)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return type(value) is int, value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False, None
        if type(value) not in (int, float):
            return False, None
        try:
            number = float(value)
        except OverflowError:
            return False, None
        return math.isfinite(number), number
    if tp is str:
        return isinstance(value, str), value
    raise AssertionError(f"no oracle for {tp}")


def same(a: Any, b: Any) -> bool:
    """a == b, NaN equal to NaN, lists equal to tuples of equal items."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def render(value: Any) -> str:
    """``value`` as the YAML text of an override (``key=<text>``), read back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    text = text[: -len("\n...\n")] if text.endswith("\n...\n") else text.rstrip("\n")
    assert same(yaml.safe_load(text), value), (value, text)
    return text


def load(files=(), overrides=()) -> tuple[Config | None, str | None]:
    """(config, None), or (None, the ConfigError's message, checked to be one line). Any other
    exception propagates: that is the failure the fuzzing looks for."""
    if currently_in_test_context():
        note(f"files={list(files)} overrides={list(overrides)}")
    try:
        return load_config(list(files), list(overrides)), None
    except ConfigError as e:
        message = str(e)
        assert len(message.splitlines()) == 1, f"a ConfigError of several lines: {message!r}"
        assert message.strip(), "an empty ConfigError"
        return None, message


def spelled(name: str) -> str:
    return repr(name)[1:-1]  # messages quote the names the user wrote with repr (one line whatever they hold)


def names(message: str, key: str) -> bool:
    """The message names section.key, or is about its section (starts with 'section.') and names key."""
    section, _, field_ = key.partition(".")
    return spelled(key) in message or (
        message.startswith(f"{section}.") and re.search(rf"\b{re.escape(field_)}\b", message) is not None
    )


def as_doc(pairs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    doc: dict[str, dict[str, Any]] = {}
    for key, value in pairs.items():
        section, _, field_ = key.partition(".")
        doc.setdefault(section, {})[field_] = value
    return doc


# ----------------------------------------------------------------------------------------------- strategies


@st.composite
def bases(draw, section: str | None = None) -> dict[str, Any]:
    """A valid combination of the keys that validation branches on (test_every_base_loads); for the keys of
    ``section``, half the time one that reads the section (its framework, a mixer of it, ccrop enabled)."""
    use = section is not None and draw(st.booleans(), label="a base that reads the section")
    framework = draw(st.sampled_from([section] if use and section in FRAMEWORKS else sorted(FRAMEWORKS)))
    fw = FRAMEWORKS[framework]
    arch = draw(st.sampled_from(VITS if fw.vit_only else ("resnet18", "vit_tiny")))
    readers = sorted(m for m, cls in MIXERS.items() if section in cls.sections)
    enabled = False if fw.masks_tokens else (True if use and readers else draw(st.booleans()))
    method = draw(st.sampled_from(readers if use and readers and enabled else sorted(MIXERS)))
    return base_overrides(framework, arch, enabled, method, ccrop=use and section == "ccrop")


def base_overrides(framework: str, arch: str, enabled: bool, method: str, ccrop: bool = False) -> dict[str, Any]:
    base = {"model.framework": framework, "model.arch": arch, "mask.enabled": enabled, "mask.method": method}
    if enabled and "saliency" in MIXERS[method].sections and not FRAMEWORKS[framework].hard_negatives:
        base["saliency.hard_negative"] = False
    if ccrop:
        base["ccrop.enabled"] = True
    return base


SPECIAL_STRINGS = ["", " ", "nan", "inf", "-inf", "1e999", "5e-4", " 7 ", "1_0", "true", "null", "~", "[1, 2]",
                   "{a: 1}", "0x10", "08", "\n", "a\nb", "'", '"', "\\", "é", "\x00", "\u2028"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**400), 10**400), st.floats(),
    st.text(max_size=6), st.sampled_from(SPECIAL_STRINGS),
)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=3), max_leaves=6)


def right_type(tp: Any) -> st.SearchStrategy:
    """Values of the annotated type, biased to the edges of the ranges validation checks (0, 1, negatives,
    lo > hi, ratios > 1, huge ints)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(right_type(args[0]), max_size=4)
        return st.tuples(*(right_type(a) for a in args)).map(list)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.integers(-3, 20), st.sampled_from([-(2**63), -1, 0, 1, 2, 7, 8, 15, 16, 100, 101, 2**31,
                                                               2**63, 10**100]), st.integers())
    if tp is float:
        return st.one_of(st.floats(-2, 2), st.sampled_from([-1.0, -1e-12, -0.0, 0.0, 5e-324, 0.5, 1.0, 1.0000001,
                                                            2.0, 1e308]),
                         st.floats(allow_nan=False, allow_infinity=False), st.integers(-3, 3),
                         st.sampled_from(["5e-4", "1e3", " 0.5 ", "-1"]))
    if tp is str:
        return st.one_of(st.text(max_size=10), st.sampled_from(["", "/nonexistent/weights.pth", "x" * 5000]))
    raise AssertionError(tp)


def wrong_type(tp: Any) -> st.SearchStrategy:
    """Values that are not of the annotated type (filtered through the oracle by the tests)."""
    origin = typing.get_origin(tp)
    specific: list[st.SearchStrategy] = []
    if origin is Literal:
        choices = typing.get_args(tp)
        specific = [st.sampled_from(choices).map(str.upper), st.sampled_from(choices).map(lambda c: [c]),
                    st.sampled_from(choices).map(lambda c: c + " "), st.integers(0, len(choices))]
    elif origin is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            specific = [right_type(args[0]), st.lists(st.text(max_size=3) | st.none(), min_size=1, max_size=3)]
        else:
            n = len(args)
            item = right_type(args[0])
            specific = [st.lists(item, max_size=n - 1), st.lists(item, min_size=n + 1, max_size=n + 2), item,
                        st.lists(st.text(max_size=3) | st.none() | st.lists(item, max_size=2), min_size=n,
                                 max_size=n),
                        st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 10**400]), min_size=n, max_size=n)]
    elif tp is bool:
        specific = [st.sampled_from([0, 1, "yes", "true", "on", "False", 0.0, [True]])]
    elif tp is int:
        specific = [st.floats(), st.sampled_from([True, False, "8", "1e3", 8.0, [8], {"a": 8}])]
    elif tp is float:
        specific = [st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity", 10**309,
                                     -(10**400), "1e999", True, "five", "", [0.5], {"lr": 0.5}])]
    elif tp is str:
        specific = [st.integers(), st.floats(), st.booleans(), st.sampled_from([None, ["a"], {"a": "b"}])]
    return st.one_of(junk, *specific)


keys = st.sampled_from([f"{s}.{k}" for s, k, _ in KEYS])
section_keys = {s: st.sampled_from([f"{s}.{k}" for k in typing.get_type_hints(cls)])
                for s, cls in SECTION_TYPES.items()}
# the per-key properties run once per section, each with a fifth of the profile's examples (40 in ci)
per_section = settings(max_examples=max(10, settings.default.max_examples // 5))


def check(base: dict[str, Any], fuzzed: dict[str, Any], cfg: Config | None, message: str | None) -> None:
    """The property. ``fuzzed``: the keys set after ``base`` (later ones win)."""
    asked = {**base, **fuzzed}
    if currently_in_test_context():  # pytest --hypothesis-show-statistics: how many load (not vacuous)
        event("loads" if cfg is not None else "ConfigError")
    if cfg is not None:  # validate accepted it: the config is what was asked
        for key, value in asked.items():
            ok, expected = convert(value, TYPES[key])
            assert ok, f"{key}={value!r} loaded, but it is not a {TYPES[key]}"
            section, _, field_ = key.partition(".")
            got = getattr(getattr(cfg, section), field_)
            assert same(got, expected), f"{key}: asked {value!r}, config holds {got!r}"
        return
    wrong = [k for k in fuzzed if not convert(fuzzed[k], TYPES[k])[0]]
    if wrong:  # a value of the wrong type: its key and no other (the first such key in the order applied)
        assert any(message.startswith(f"{k}: ") for k in wrong), message
        return
    named = [k for k in asked if names(message, k)]
    # a bad value of the right type names its key; where only a combination with the base's choices is bad
    # (saliency.hard_negative with a framework without negatives, ...), naming a key of the base will do
    assert named, f"the message names none of {sorted(asked)}: {message}"


# -------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_every_base_loads(framework):
    """The strategies' starting points are valid configs (else the properties would test nothing)."""
    fw = FRAMEWORKS[framework]
    for arch, enabled, method in itertools.product(VITS if fw.vit_only else ("resnet18", "vit_tiny"),
                                                   (False,) if fw.masks_tokens else (False, True), sorted(MIXERS)):
        base = base_overrides(framework, arch, enabled, method)
        cfg, message = load([], [f"{k}={render(v)}" for k, v in base.items()])
        assert message is None, message
        check(base, {}, cfg, None)


@pytest.mark.parametrize("key, value", [
    ("data.crop_scale", [0.5]), ("data.mean", ["a", "b", "c"]), ("mask.grid", True), ("optim.lr", math.nan),
    ("finetune.lr", math.nan), ("optim.momentum", math.inf), ("optim.lr", 10**400), ("data.image_size", 2.0),
    ("model.framework", 1), ("eval.milestones", [None]),
])
def test_examples_of_the_issue(key, value):
    cfg, message = load([], [f"{key}={render(value)}"])
    assert cfg is None and message.startswith(f"{key}: "), message


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=" + "9" * 400, "optim.lr: expected a finite number"),  # was OverflowError
    ("optim.epochs=" + "9" * 5000, "value is not valid YAML (ValueError: Exceeds the limit"),  # was ValueError
    ("optim.epochs=!!int abc", "value is not valid YAML (ValueError: invalid literal"),  # was ValueError
    ("mask.enabled=!!bool maybe", "value is not valid YAML (KeyError: 'maybe')"),  # was KeyError
    ("run.name=!!timestamp x", "value is not valid YAML (AttributeError"),  # was AttributeError
    ("run.name=!!int", "value is not valid YAML (IndexError"),  # was IndexError
    ("run.name=2020-13-45", "value is not valid YAML (ValueError: month must be in 1..12)"),  # was ValueError
    ("optim.epochs=0b" + "1" * 20000, "optim.epochs: a 20000-bit integer is too large"),  # unprintable int
    ("mask.kind=" + "1:" * 3000 + "1", "mask.kind: <int too large to print>"),  # was ValueError in the message
    ("optim.lr=\x07", "value is not valid YAML (unacceptable character"),  # was AttributeError (no .problem)
    ("optim.lr=" + "[" * 5000, "value is not valid YAML (nested too deeply)"),  # was RecursionError
    ("finetune.lr=.nan", "finetune.lr: expected a finite number"),  # passed `lr <= 0`
    ("optim.weight_decay=.inf", "optim.weight_decay: expected a finite number"),  # loaded
    ("a\n.b=1", "unknown section 'a\\n'"),  # was a message of two lines
    ("saliency.weights=" + "x" * 5000, "saliency.weights: no such file"),  # was OSError (name too long)
])
def test_bugs_found(override, needle):
    base = ["mask.method=saliency", "saliency.source=file"] if override.startswith("saliency") else []
    cfg, message = load([], base + [override])
    assert cfg is None and needle in message, message


@pytest.mark.parametrize("section", sorted(SECTION_TYPES))
@per_section
@given(data=st.data())
def test_wrong_type_on_the_command_line_is_one_line_naming_the_key(section, data):
    """(a) Wrong types: strings for numbers, lists of the wrong length, numbers for Literals, None, dicts,
    NaN / inf / ints beyond a float for floats, bools for ints... never load, and the error names the key."""
    base = data.draw(bases(section), label="base")
    key = data.draw(section_keys[section], label="key")
    value = data.draw(wrong_type(TYPES[key]), label="value")
    cfg, message = load([], [f"{k}={render(v)}" for k, v in {**base, key: value}.items()])
    check(base, {key: value}, cfg, message)


@pytest.mark.parametrize("section", sorted(SECTION_TYPES))
@per_section
@given(data=st.data())
def test_right_type_on_the_command_line_loads_or_names_the_key(section, data):
    """(b) Right type, any range (negative sizes, ratios > 1, zero batch, lo > hi, huge ints...): it loads
    as asked, or one ConfigError line names the key; keys of unselected sections are errors too."""
    base = data.draw(bases(section), label="base")
    key = data.draw(section_keys[section], label="key")
    value = data.draw(right_type(TYPES[key]), label="value")
    cfg, message = load([], [f"{k}={render(v)}" for k, v in {**base, key: value}.items()])
    check(base, {key: value}, cfg, message)


@given(base=bases(), data=st.data())
def test_several_keys_in_a_yaml_file(base, data, yaml_file):
    """(a) + (b) through a YAML file, several keys at once, the base in the file or on the command line."""
    pairs = data.draw(st.dictionaries(keys, st.none(), min_size=1, max_size=4), label="keys")
    fuzzed = {k: data.draw(st.one_of(right_type(TYPES[k]), wrong_type(TYPES[k])), label=k) for k in pairs}
    if data.draw(st.booleans(), label="base on the command line"):  # the file first, then the command line
        fuzzed = {k: v for k, v in fuzzed.items() if k not in base}
        yaml_file.write_text(yaml.safe_dump(as_doc(fuzzed)))
        cfg, message = load([yaml_file], [f"{k}={render(v)}" for k, v in base.items()])
        check({}, {**fuzzed, **base}, cfg, message)
    else:
        yaml_file.write_text(yaml.safe_dump(as_doc({**base, **fuzzed})))
        cfg, message = load([yaml_file])
        check(base, fuzzed, cfg, message)


identifier = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
odd_name = st.one_of(identifier, st.text(max_size=6).filter(lambda s: "=" not in s and "." not in s))


@given(base=bases(), data=st.data())
def test_unknown_sections_and_keys(base, data, yaml_file):
    """(c) Unknown sections and keys (also odd names: spaces, newlines, unicode) name what was written."""
    section = data.draw(st.one_of(st.sampled_from(sorted(SECTION_TYPES)), odd_name), label="section")
    known = section in SECTION_TYPES and typing.get_type_hints(SECTION_TYPES[section])
    name = data.draw(odd_name.filter(lambda n: not known or n not in known), label="key")
    value = data.draw(junk, label="value")
    where = data.draw(st.sampled_from(["cli", "yaml"]), label="where")
    if where == "cli" and not (section and name):
        return  # an empty section or key is a malformed override (test_malformed_overrides)
    if where == "cli":
        cfg, message = load([], [f"{k}={render(v)}" for k, v in base.items()] + [f"{section}.{name}={render(value)}"])
    else:
        doc = as_doc(base)
        doc.setdefault(section, {})[name] = value
        yaml_file.write_text(yaml.safe_dump(doc))
        cfg, message = load([yaml_file])
    assert cfg is None
    expected = f"unknown key {repr(f'{section}.{name}')}" if known else f"unknown section {section!r}"
    assert expected in message, message


MALFORMED = ["a", "a.b", "a.b.c=1", "=1", ".b=1", "a.=1", "optim.lr", "optim..lr=1", "optim.lr.x=1", "optim=1",
             "optim.lr =1", "", ".", "=", "..=", "optim.lr\n=1", "optim\n.lr=1"]
BAD_YAML = ["[", "{", "]", "[1, 2", "{a: 1", ": :", "\x07", "*x", "&a", "!!python/object:os.system", "'a",
            '"a', "a: b: c", "\t1", "[" * 100, "9" * 5000, "- a\n b: 1", "!!binary ***", "%YAML 1.1",
            "!!int abc", "!!float abc", "!!bool maybe", "!!timestamp x", "!!int", "!!int 0x", "2020-13-45",
            "2020-02-30 25:61:61"]


@given(item=st.one_of(st.sampled_from(MALFORMED), st.sampled_from(BAD_YAML).map(lambda v: f"optim.lr={v}"),
                      st.text(max_size=12), st.text(max_size=12).map(lambda s: f"optim.lr={s}"),
                      st.builds(lambda a, b, c: f"{a}.{b}={c}", st.text(max_size=4), st.text(max_size=4),
                                st.text(max_size=4))))
def test_malformed_overrides(item):
    """(c) Any override text: it loads, or one ConfigError line names the override (malformed, invalid YAML)
    or the section / key it spells."""
    cfg, message = load([], [item])
    key, sep, raw = item.partition("=")
    if cfg is not None:
        assert sep and key in TYPES, item
        return
    if not sep or key.count(".") != 1 or not all(key.split(".")):
        assert message == f"override {item!r}: expected section.field=value", message
        return
    section, name = key.split(".")
    assert (repr(item) in message or spelled(section) in message or spelled(key) in message), message


@given(text=st.one_of(st.text(max_size=40), st.sampled_from(BAD_YAML),
                      st.builds(lambda s, k, v: f"{s}:\n  {k}: {v}\n", st.sampled_from(sorted(SECTION_TYPES)),
                                st.sampled_from([k for _, k, _ in KEYS]), st.sampled_from(BAD_YAML + SPECIAL_STRINGS))),
       raw=st.one_of(st.none(), st.binary(max_size=12)))
def test_any_yaml_file(text, raw, yaml_file):
    """(c) Any file content (text, invalid YAML, not UTF-8): it loads, or one ConfigError line names the file
    or a key of the config."""
    if raw is None:
        yaml_file.write_text(text)
    else:
        yaml_file.write_bytes(raw)
    cfg, message = load([yaml_file])
    if cfg is None:
        known = "|".join(map(re.escape, SECTION_TYPES))
        assert str(yaml_file) in message or re.match(rf"({known})\.\w+", message), message


def test_missing_and_unreadable_files(tmp_path):
    """Not there, a directory, a name too long for the file system (was OSError), a NUL in the name."""
    for path in [tmp_path / "none.yaml", tmp_path, tmp_path / ("x" * 5000), "a\x00b.yaml"]:
        cfg, message = load([path])
        assert cfg is None and str(path) in message, message


@pytest.fixture(scope="module")
def yaml_file(tmp_path_factory):
    """One file the examples overwrite (a function-scoped tmp_path would be shared by all examples anyway)."""
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"
