"""model.compile: torch.compile of the framework's networks in place (frameworks/base.py compile_networks).

The inductor test compiles a tiny model's forward and backward (tens of seconds of C++ compilation on a
CPU the first time; inductor's FX graph cache makes reruns fast); the train.py round trip
(tests/test_compile_train.py) uses the aot_eager backend (the same dynamo capture and AOT autograd, no code
generation) to stay fast."""

from __future__ import annotations

import copy

import pytest
import torch

from mixmask.batch import Batch, Mixed
from mixmask.config import ConfigError, load_config
from mixmask.frameworks import FRAMEWORKS
from mixmask.frameworks.base import RECOMPILE_LIMIT, compile_networks
from mixmask.frameworks.simclr import SimCLRConfig
from test_batch_views import build, make_batch  # tests/mixmask

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_compile_in_place_keeps_classes_and_state_dict_keys():
    model = build("byol")
    keys, classes = list(model.state_dict()), {n: type(m) for n, m in model.named_modules()}
    assert compile_networks(model, "none") == []
    assert compile_networks(model, "default", backend="eager") == ["online", "predictor", "target"]
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints and export unchanged
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.online._compiled_call_impl is not None and model.backbone._compiled_call_impl is None
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    for bad in ({"mode": "fast"}, {"mode": "default", "backend": "tvm"},
                {"mode": "max-autotune", "backend": "aot_eager"}):
        with pytest.raises(ValueError):
            compile_networks(build("simclr"), **bad)


@pytest.mark.parametrize("overrides,needle", [
    (["model.compile=fast"], "model.compile"),
    (["model.compile_dynamic=true"], "model.compile_dynamic is set, but model.compile=none"),
    (["model.compile_backend=aot_eager"], "model.compile_backend is set, but model.compile=none"),
    (["model.compile=reduce-overhead", "model.compile_backend=eager"], "model.compile_backend=eager"),
    (["model.compile_dynamic=1"], "model.compile_dynamic"),
    (["model.framework=cmae", "model.arch=vit_tiny", "mask.enabled=false", "model.patch_size=8",
      "model.batch_views=true"], "model.batch_views"),
])
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config([], overrides)


def test_config_accepts_compile_settings():
    cfg = load_config([], ["model.compile=max-autotune", "model.compile_dynamic=true", "model.batch_views=true"])
    assert (cfg.model.compile, cfg.model.compile_dynamic, cfg.model.batch_views) == ("max-autotune", True, True)


def test_inductor_compiled_step_equals_eager():
    """One training step of a tiny SimCLR (ResNet-10, small stem, 8 px, batch 4, float32): the inductor-compiled
    networks give the eager loss within 1e-5 (relative) and gradients within 1e-4 of each tensor's scale
    (inductor fuses and reorders float32 reductions)."""
    torch.manual_seed(0)
    eager = FRAMEWORKS["simclr"](SimCLRConfig(dim=8, mlp_hidden=16), arch="resnet10", stem="small")
    compiled = copy.deepcopy(eager)
    assert compile_networks(compiled, "default") == ["encoder"]
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g), torch.zeros(4, dtype=torch.long))
    a, b = eager(batch), compiled(batch)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
    a["loss"].backward()
    b["loss"].backward()
    for (k, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4 * float(p.grad.abs().max()) + 1e-7,
                                   msg=lambda m: f"{k}: {m}")
    for k, v in eager.state_dict().items():  # BN running statistics updated inside the compiled graph
        torch.testing.assert_close(compiled.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_resolution_change_recompiles_within_the_limit():
    """dynamic=False: each new image size is one more compiled entry per network, never the eager fallback
    (aot_eager: the same dynamo guards and caches as inductor, no code generation)."""
    import torch._dynamo.utils as du

    torch._dynamo.reset()
    model = build("byol")  # three networks: online, predictor, target
    compile_networks(model, "default", dynamic=False, backend="aot_eager")
    model.batch_views = True
    du.counters.clear()
    base = make_batch(0, mixes=1)
    for size in (8, 12, 8):  # progressive resolution, then back to a size already compiled
        resize = lambda x: torch.nn.functional.interpolate(x, size=size)  # noqa: E731
        batch = Batch(resize(base.x1), resize(base.x2), base.labels,
                      mixes=tuple(Mixed(resize(m.x), m.perm, m.lam) for m in base.mixes))
        model(batch)["loss"].backward()
    assert not du.counters["stats"].get("recompile_limit_hit") and not du.counters["stats"].get("cache_size_limit_hit")
    # online and target: one graph per size; the predictor sees (N, D) whatever the size: one; 8 px again: hits
    assert du.counters["stats"]["unique_graphs"] == 2 + 2 + 1
