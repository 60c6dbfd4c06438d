"""Trait-local pytest setup for ``pytest traits/ --trait NAME``.

The options (``--trait`` and the ``--harness-...`` family: ``--harness-model``, ``--harness-judge``,
``--harness-judge-base-url``, ``--harness-update-reference``, ...) and the fixtures (``trait``,
``trait_run``, ``trait_vector``, ``eval_activations``, ``reference_vector``, ``acceptance``, ...) come
from the installed ``persona_harness`` pytest plugin (``harness/acceptance/plugin.py``). Do not add
``pytest_addoption`` here: an option defined in this conftest would be unknown to
``pytest --trait x`` run from the repository root. Trait-local fixtures belong here.
"""

from __future__ import annotations

import os

# The checks run offline: the embedded model ships with the package and no hub is reachable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
