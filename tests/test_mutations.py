"""Mutation tests: ``pytest traits/ --trait sycophantic`` on the embedded model must fail for a
deliberately broken vector, with no stored reference to compare against.

Each case runs the real acceptance suite in a subprocess (a project holding a copy of the shipped
sycophantic trait, without its reference folder, and the one-line test module) with the test-only
``mutant`` extractor of tests/mutation_plugin.py, and asserts which check fails. The control case
(the true vector) must fail none. The generations and judgments come from the shared cache, so
after the first case each one costs an extraction and the checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".harness_cache"  # the cache `pytest traits/ --trait sycophantic` uses too

#: mutation -> the checks that must fail (a case may fail more)
MUTATIONS = {
    "none": set(),
    "other:evil": {"test_specificity"},
    "other:hallucinating": {"test_specificity", "test_heldout_cosine"},
    "prompt_last": {"test_heldout_cosine"},
    "prompt_avg": {"test_heldout_cosine", "test_norm_peak"},
    "flip": {"test_heldout_cosine", "test_projection_auroc"},
    "random": {"test_heldout_cosine"},
    "shuffled": {"test_heldout_cosine", "test_norm_peak"},
    "pos_only": {"test_heldout_cosine", "test_norm_peak"},
    "layer_shift": {"test_heldout_cosine"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Another project with the shipped sycophantic trait but no reference vector."""
    d = tmp_path_factory.mktemp("mutations")
    t = d / "traits" / "sycophantic"
    t.mkdir(parents=True)
    for f in ("extract.json", "eval.json", "checks.json"):
        shutil.copy(ROOT / "traits" / "sycophantic" / f, t / f)
    (d / "traits" / "test_mutant_acceptance.py").write_text("from harness.acceptance import *  # noqa: F401,F403\n")
    return d


def _run(project: Path, mutation: str) -> tuple[dict[str, str], str]:
    xml = project / f"junit-{mutation.replace(':', '-')}.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "PERSONA_HARNESS_TEST_MUTATION": mutation, "PERSONA_HARNESS_PLUGINS": "mutation_plugin",
           "PERSONA_HARNESS_EXTRACTOR": "mutant", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "traits", "--trait", "sycophantic", "-p", "no:cacheprovider",
                        "--harness-traits-dir", str(project / "traits"),
                        "-p", "no:randomly", "--harness-cache", str(CACHE), "--harness-run-dir",
                        str(project / "runs" / mutation.replace(":", "-")), f"--junitxml={xml}", "-q", "-rfs"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=3000)
    outcomes = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = case.get("name", "").split("[")[0]
            outcomes[name] = ("failed" if case.find("failure") is not None or case.find("error") is not None
                              else "skipped" if case.find("skipped") is not None else "passed")
    return outcomes, p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_acceptance_fails_for_a_broken_vector_without_a_reference(project, mutation):
    outcomes, out = _run(project, mutation)
    assert outcomes, out[-4000:]
    assert str(project / "traits" / "sycophantic" / "reference") in out or "no reference vector" in out, out[-3000:]
    assert "test_reference_cosine" in outcomes and outcomes["test_reference_cosine"] == "skipped", out[-3000:]
    failed = {k for k, v in outcomes.items() if v == "failed"}
    want = MUTATIONS[mutation]
    if not want:
        assert not failed, f"the true vector failed {sorted(failed)}:\n{out[-4000:]}"
    else:
        assert want <= failed, f"{mutation}: expected {sorted(want)} to fail, failed {sorted(failed)}:\n{out[-4000:]}"
