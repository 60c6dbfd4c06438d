"""The GPU machine has torch and transformers but no instructor/openai/gguf: the core, the CLI's
registries and the benchmarks must run without them (heavy or optional imports stay lazy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCK = ("instructor", "openai", "gguf", "pydantic", "matplotlib", "accelerate", "llama_cpp")

SCRIPT = r'''
import sys
BLOCK = %r
import importlib.machinery as M
class Absent:  # the path finder, minus the blocked packages: they look not installed at all
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            return None
        return M.PathFinder.find_spec(name, path, target)
    def invalidate_caches(self):
        M.PathFinder.invalidate_caches()
    def find_distributions(self, *a, **k):  # entry points (pytest plugins) still load
        return M.PathFinder.find_distributions(*a, **k)
sys.meta_path[:] = [Absent() if f is M.PathFinder else f for f in sys.meta_path]
import importlib.util
assert importlib.util.find_spec("instructor") is None
import harness, harness.cli
from harness.core.plugins import build_registry, get_plugin_manager
pm = get_plugin_manager()
names = {k: sorted(build_registry(pm, k).names()) for k in ("generator", "judge", "filter", "extractor")}
assert "fast" in names["generator"] and "instructor" in names["judge"], names
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCK)
assert not loaded, loaded
import pytest
sys.exit(pytest.main(["benchmarks/test_bench_generate.py", "benchmarks/test_bench_pipeline.py", "-q",
                      "--benchmark-disable", "-p", "no:cacheprovider", "-k", "fast"]))
'''


def test_core_cli_registries_and_benchmarks_run_without_optional_packages():
    out = subprocess.run([sys.executable, "-c", SCRIPT % (BLOCK,)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "2 passed" in out.stdout
