#!/usr/bin/env bash
# The test command (README "Test"; .ci/run calls exactly this).
# Installs bge-ray with its test extras (the CPU build of torch first where there is no GPU),
# lints, and runs the whole suite on one local Ray cluster. `--fast`: only the tests that start
# no Ray cluster or process group and train nothing (pytest -m "not slow"); other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m ruff check .
if [[ "${1:-}" == "--fast" ]]; then
  shift
  exec python -m pytest -m "not slow" "$@"
fi
exec python -m pytest "$@"
