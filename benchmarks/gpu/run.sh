#!/usr/bin/env bash
# The GPU check on a machine without a package index (the device machine, an air-gapped node):
# installs .gpu-bundle/ (built by benchmarks/gpu/bundle.py where there is an index) with
# `pip install --no-index`, then runs benchmarks/gpu/check.py. From the repository root:
#   bash benchmarks/gpu/run.sh [check.py options]       # results in $OUT (or ./gpu-check-out)
set -uo pipefail
cd "$(dirname "$0")/../.."
BUNDLE="${BUNDLE:-.gpu-bundle}"
OUT="${OUT:-$PWD/gpu-check-out}"
SITE="${SITE:-/tmp/bge-ray-site}"
WORK="${WORK:-/tmp/gpu_check}"
mkdir -p "$OUT"
[ -f "$BUNDLE/manifest.json" ] || { echo "no $BUNDLE/manifest.json: build it with python benchmarks/gpu/bundle.py" >&2; exit 2; }
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$BUNDLE"/wheels/*.whl || exit 3
python3 -m compileall -q -j 0 "$SITE" >/dev/null 2>&1
echo "[gpu-check] bundle installed in $(( $(date +%s) - t0 )) s" >&2
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
python3 benchmarks/gpu/check.py --bundle "$BUNDLE" --work "$WORK" --out "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/check.log"
rc=${PIPESTATUS[0]}
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
exit "$rc"
