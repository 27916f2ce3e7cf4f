#!/usr/bin/env bash
# The one GPU call: the benchmark suite, then the gpu-marked tests; results and logs under $OUT. Under 10 minutes:
# the suite stops starting entries after BENCH_BUDGET s (default 320) and is killed at BENCH_TIMEOUT (350); the
# tests get TEST_TIMEOUT (240; the GPU suite took 139-172 s on an H100, the suite about 256 s).
#
#   bash scripts/bench_gpu.sh                      # full suite (paper shapes), JSON in $OUT/bench.json
#   bash scripts/bench_gpu.sh --quick --only prefill,decode
#
# Afterwards, on this machine: copy $OUT/bench.json to benchmarks/results/<name>.json and run `saisa bench report`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/saisa-bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu --format=csv
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

timeout -k 10 "${BENCH_TIMEOUT:-350}" "$PY" -m saisa.bench.cli run --budget-s "${BENCH_BUDGET:-320}" \
  --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

if "$PY" -c "import pytest" 2>/dev/null; then
  timeout -k 10 "${TEST_TIMEOUT:-240}" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log"
  test_rc=${PIPESTATUS[0]}
else
  echo "pytest is not installed here: gpu tests not run" | tee "$OUT/pytest-gpu.log"
  test_rc=0
fi

echo "bench rc=$bench_rc, gpu tests rc=$test_rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
tail -n 1 "$OUT/bench.log"  # the JSON line, last in the reply
[ "$bench_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
