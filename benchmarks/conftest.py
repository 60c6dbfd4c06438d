"""Benchmark options. ``--bench-model qwen7b-shape`` (GPU: Qwen2.5-7B shape, random weights),
``smollm2`` (the embedded model) or ``tiny``; ``--bench-smoke`` (default on CPU) uses small sizes so
``pytest benchmarks/ --benchmark-disable`` runs in CI in well under two minutes."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    g = parser.getgroup("persona-harness benchmarks")
    g.addoption("--bench-model", default=None, help="qwen7b-shape | smollm2 | tiny (default: tiny on CPU, qwen7b-shape on CUDA)")
    g.addoption("--bench-smoke", action="store_true", default=None, help="small sizes (default on CPU)")
    g.addoption("--bench-full", action="store_true", default=False, help="full sizes even on CPU")
    g.addoption("--bench-work", default="record", choices=("record", "paper"),
                help="record: the benchmarks of record (n x fixed lengths); paper: also the paper's generation "
                     "workload at full size (2000 requests, up to 1000 new tokens, variable lengths)")


@pytest.fixture(scope="session")
def bench(request):
    import torch

    import _bench

    cuda = torch.cuda.is_available()
    name = request.config.getoption("--bench-model") or ("qwen7b-shape" if cuda else "tiny")
    smoke = not request.config.getoption("--bench-full") and (request.config.getoption("--bench-smoke") or not cuda)
    lm = _bench.build_model(name)
    w = _bench.work_for(name, smoke)
    _bench.ceilings(lm)  # copy bandwidth and matmul rate, measured once per session
    _bench.warm_up(lm)  # CUDA context, cuBLAS handles and allocator before any timed baseline
    paper = _bench.paper_work(smoke and request.config.getoption("--bench-work") != "paper")
    return {"lm": lm, "work": w, "paper": paper, "info": _bench.device_info(lm), "results": {}}
