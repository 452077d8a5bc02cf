"""The benchmark command runs (quick CI shapes) and writes the promised JSON keys."""
import json


def test_benchmark_quick(run_python, tmp_path):
    out = tmp_path / "kbench.json"
    proc = run_python("import sys, runpy; sys.argv = ['benchmarks.kernels', '--quick', '--json', "
                      f"{str(out)!r}]; runpy.run_module('benchmarks.kernels', run_name='__main__')", {})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    for key in ("fused_gbps", "copy_gbps", "torch_ref_ms", "fused_ms", "device"):
        assert key in data
    assert data["fused_gbps"] > 0 and data["copy_gbps"] > 0
    assert all(r["matches_reference"] for r in data["results"] if r["backend"] == "cpu")
    assert {r["dtype"] for r in data["results"]} == {"float16", "bfloat16", "float32"}
