#!/usr/bin/env bash
# One call on the GPU machine: build, run every test (GPU ones included), benchmark ($BENCHES, default all;
# BENCHES="" runs none; an entry op:a,b runs bench_op.py with arguments a b).
# Expects HF diffusers' wheel (and importlib_metadata) in .whl/ (README, "Benchmarks").
# TESTS narrows the test paths (default tests), SKIP_TESTS=1 skips them. TIER=smoke runs the GPU smoke tier,
# TIER=K/N part K of N of the GPU tests (tests/support/gpu_tiers.py; README, "Tests"); each test's seconds go
# to $OUT/gpu_durations.json (copy it over tests/gpu_durations.json to rebalance the parts).
# Writes build.log, pytest.log, bench.log and the CSV files under $OUT (default ./out).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FUSEDIFF_COMMIT=${FUSEDIFF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
if [ -z "${SKIP_TESTS:-}" ]; then
  tier=(); [ -n "${TIER:-}" ] && tier=(--gpu-tier "$TIER" --gpu-durations "$OUT/gpu_durations.json")
  python3 -m pytest ${TESTS:-tests} -q -p no:cacheprovider "${tier[@]}" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -30
  echo "tests: $(( $(date +%s) - start )) s"
fi
for spec in ${BENCHES-scheduler_step group_norm attention timestep_embedding}; do
  op=${spec%%:*}; args=""
  [[ $spec == *:* ]] && args=${spec#*:} && args=${args//,/ }
  python3 "bench/bench_$op.py" --out "$OUT" $args ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
done
echo "total: $(( $(date +%s) - start )) s"
