"""Test-only plugin for tests/test_interrupt.py: a tiny random model and SIGKILL at chosen points.

Loaded by a subprocess with ``--plugin kill_plugin`` (tests/ on PYTHONPATH). It serves model id
``tiny`` (the conftest tiny Llama: seeded random weights, the embedded model's tokenizer) and
wraps the built-in ``hf`` generator, ``local`` judge and ``mean-diff`` extractor so that
``PERSONA_HARNESS_TEST_KILL_AT=stage:n[,stage:n...]`` kills the process with SIGKILL when the
n-th (0-based) batch of that stage starts in this process:

  generate:n   before generate() batch n        judge:n     before judge() batch n
  extract:n    before activation forward n      after-<stage>:0  when <stage> has finished
With ``PERSONA_HARNESS_TEST_LOG=FILE`` it appends the ids of every finished batch to FILE.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from harness.core.hookspecs import hookimpl
from harness_plugins.extract_mean_diff import MeanDiffExtractor
from harness_plugins.generate_hf import HFGenerator
from harness_plugins.judge_local import LocalJudge

KILL_ENV = "PERSONA_HARNESS_TEST_KILL_AT"
_counts: dict[str, int] = {}
_models: dict[str, object] = {}


def tick(stage: str) -> None:
    n = _counts.get(stage, 0)
    _counts[stage] = n + 1
    for part in os.environ.get(KILL_ENV, "").split(","):
        st, _, b = part.strip().partition(":")
        if st == stage and b and int(b) == n:
            sys.stderr.write(f"kill_plugin: SIGKILL at {stage}:{n}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def log_done(kind: str, ids) -> None:
    """Append the ids of a finished batch to $PERSONA_HARNESS_TEST_LOG (to prove no work is redone)."""
    path = os.environ.get("PERSONA_HARNESS_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(f"{kind} {i}\n" for i in ids))


class KillGenerator(HFGenerator):
    def generate(self, requests, ctx):
        tick("generate")
        out = super().generate(requests, ctx)
        log_done("generate", [g.id for g in out])
        return out


class KillJudge(LocalJudge):
    def judge(self, items, ctx):
        tick("judge")
        out = super().judge(items, ctx)
        log_done("judge", [f"{j.generation_id}/{j.metric}" for j in out])
        return out


@hookimpl
def harness_load_model(model_id, settings):
    if model_id != "tiny":
        return None
    if "tiny" not in _models:
        sys.path.insert(0, str(Path(__file__).parent))
        from harness.testing import make_tiny_lm

        from harness.models.loading import embedded_model_dir

        lm = make_tiny_lm(embedded_model_dir())

        def pre_hook(module, args, kwargs):
            if kwargs.get("output_hidden_states"):
                tick("extract")

        lm.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        _models["tiny"] = lm
    return _models["tiny"]


@hookimpl
def harness_register_generators(register):
    register("hf", KillGenerator, description="test: hf generator that can SIGKILL itself")


@hookimpl
def harness_register_judges(register):
    register("local", KillJudge, description="test: local judge that can SIGKILL itself")


@hookimpl
def harness_register_extractors(register):
    register("mean-diff", MeanDiffExtractor, description="test: mean-diff (kills via the model hook)")


@hookimpl
def harness_stage_finished(run, stage, records):
    tick(f"after-{stage}")
