"""Boundary: kernels/ is numpy + numba only. Importing it (every module, in a fresh process) must
not import torch, and `import kernels` must not import numba.cuda (the CUDA entry is lazy)."""
import ast

SCRIPT = r'''
import sys, pkgutil, importlib
import kernels
assert "torch" not in sys.modules, "import kernels imported torch"
assert "numba.cuda" not in sys.modules, "import kernels imported numba.cuda eagerly"
names = [m.name for m in pkgutil.iter_modules(kernels.__path__, "kernels.")]
for name in names:
    importlib.import_module(name)
kernels.fused_mix_cuda  # the lazy entry resolves
assert "torch" not in sys.modules, [m for m in sys.modules if m.startswith("torch")][:5]
print("OK", " ".join(sorted(names)))
'''


def test_import_kernels_does_not_import_torch(run_python):
    proc = run_python(SCRIPT, {})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout.split()
    assert out[0] == "OK" and "kernels.mix_cuda" in out and "kernels.mix" in out


def test_no_torch_in_kernels_sources(repo_root):
    for path in sorted((repo_root / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] == "torch" for m in mods), f"{path.name}: imports torch"
