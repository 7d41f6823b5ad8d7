#!/usr/bin/env bash
# One command for a GPU machine: build and install spa_kernels, run the GPU tests, fill the cuda/triton autotune
# table, run every benchmarks/bench_*.py, and pack the results into OUTDIR.
#
#   benchmarks/run_gpu.sh OUTDIR
#
# OUTDIR gets two files: summary.txt (versions, the build time, each step's status and duration, the test tally)
# and gpu_results.tar.gz (logs/, the benchmark CSV/PNG files, the autotune table, the tests' JUnit XML).
# Every step has a time limit so the whole run stays within SPA_GPU_BUDGET_S seconds (default 540); a benchmark is
# run with options that bound its sweep (see bench_args) and skipped when too little time is left. A failing step
# is recorded and the run goes on. Needs no network: `pip install --no-deps --no-build-isolation -e .`.
# Environment: CUDA_HOME (default /usr/local/cuda), PYTHON (default python), SPA_GPU_BUDGET_S, SPA_SKIP_INSTALL=1
# (use the spa_kernels already importable, e.g. for a second run on a warm machine), SPA_GPU_QUICK=1 (below),
# SPA_GPU_SANITIZE=1 (also run scripts/sanitize_cuda.sh with the tools in SPA_GPU_SANITIZE_TOOLS, default
# "memcheck racecheck"; give it SPA_GPU_BUDGET_S=780 or so), SPA_GPU_BENCH=0 (build, tests and sanitizer only: no
# autotune table, no benchmarks). MAX_JOBS defaults to the machine's cores for the build.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
BUDGET="${SPA_GPU_BUDGET_S:-540}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ] && command -v nvcc >/dev/null; then  # a toolkit elsewhere, nvcc on PATH
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
fi
STAGE="$(mktemp -d)"
mkdir -p "$STAGE/logs" "$STAGE/results" "$STAGE/autotune"
export SPA_KERNELS_CACHE_DIR="$STAGE/autotune"  # a fresh table, shipped with the results
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"  # setup.py would cap it by the free memory, which starts low on some VMs
SUMMARY="$STAGE/summary.txt"
START=$SECONDS
MARK="$STAGE/.start"
touch "$MARK"

left() { echo $((BUDGET - (SECONDS - START))); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD...: runs CMD with a time limit (never past the budget), logs to logs/NAME.log.
step() {
  local name=$1 limit=$2 rc t0
  shift 2
  local remaining
  remaining=$(( $(left) - 15 ))  # keep time to pack the results
  if [ "$remaining" -lt 20 ]; then
    note "$(printf '%-28s SKIPPED (budget spent)' "$name")"
    return 0
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$STAGE/logs/$name.log" 2>&1
  rc=$?
  local verdict="ok"
  [ $rc -ne 0 ] && verdict="FAILED (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT after ${limit}s"
  note "$(printf '%-28s %-24s %4ds' "$name" "$verdict" $((SECONDS - t0)))"
  return $rc
}

# Options that bound each benchmark's sweep on a GPU (scripts not listed run with their defaults); SPA_GPU_QUICK=1
# runs every benchmark with --quick instead (a dry run of this script, e.g. on a CPU machine).
bench_args() {
  if [ "${SPA_GPU_QUICK:-0}" = "1" ]; then
    echo "--quick"
    return
  fi
  case "$1" in
    bench_logprobs.py) echo "--dtypes bfloat16,float32 --vocab 32000,128256 --tokens 2048,8192 --reps 3" ;;
    bench_fused_linear_dpo.py) echo "--pairs 2,8 --seq 1024 --reps 3" ;;
    bench_trl_step.py) echo "--reps 2" ;;
    *) echo "" ;;
  esac
}

note "spa_kernels GPU run: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{
  nvidia-smi 2>&1 || true
  "$CUDA_HOME/bin/nvcc" --version 2>&1 || echo "no nvcc at $CUDA_HOME/bin/nvcc"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} >"$STAGE/logs/env.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /' \
  | tee -a "$SUMMARY" || true
grep -E "^python|^triton|release" "$STAGE/logs/env.log" | tee -a "$SUMMARY" || true

# 1. build + install (timed: the .cu compile time is what CI pays)
if [ "${SPA_SKIP_INSTALL:-0}" != "1" ]; then
  t0=$SECONDS
  step install 240 "$PY" -m pip install --no-deps --no-build-isolation -v -e .
  note "build+install time: $((SECONDS - t0)) s"
fi
step info 60 "$PY" -m spa_kernels.info
cat "$STAGE/logs/info.log" >>"$SUMMARY"

# 2. the build test (the archs the CUDA kernels were compiled for), then every GPU test
step build_test 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_build.py
# -v: every test's verdict is in the log as it finishes (a step cut off by its limit still says what failed);
# pytest-xdist, where installed, spreads the Triton JIT compiles over the cores.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${SPA_GPU_TEST_WORKERS:-8}")
step tests "${SPA_GPU_TESTS_S:-150}" "$PY" -m pytest -v -rfE --tb=short -p no:cacheprovider "${XDIST[@]}" \
  -m "gpu and not slow" --junitxml="$STAGE/results/gpu_tests.xml" tests/
grep -E "^[0-9=]+ .*(passed|failed)|^=+ .*(passed|failed)" "$STAGE/logs/tests.log" | tail -n 1 | sed 's/^/tests: /' \
  | tee -a "$SUMMARY"
grep -E "^(FAILED|ERROR) " "$STAGE/logs/tests.log" | head -n 40 | tee -a "$SUMMARY"

# optional: the CUDA tests under compute-sanitizer (memcheck, racecheck), before the benchmarks
if [ "${SPA_GPU_SANITIZE:-0}" = "1" ]; then
  # shellcheck disable=SC2086
  step sanitize 240 scripts/sanitize_cuda.sh ${SPA_GPU_SANITIZE_TOOLS:-memcheck racecheck}
fi
if [ "${SPA_GPU_BENCH:-1}" = "0" ]; then
  note "autotune and benchmarks skipped (SPA_GPU_BENCH=0)"
else

# 3. the measured cuda/triton table that impl="auto" uses
step autotune 90 "$PY" -m spa_kernels.autotune --dtypes bfloat16 --vocab 32000,128256 --copy-to "$STAGE/results"

# 4. every benchmark
for bench in benchmarks/bench_*.py; do
  name="$(basename "$bench")"
  # shellcheck disable=SC2046
  limit=150
  [ "$name" = bench_trl_step.py ] && limit=200  # one process per variant
  step "${name%.py}" "$limit" "$PY" "$bench" $(bench_args "$name")
done
fi

# 5. pack
find benchmarks/results -type f -newer "$MARK" -exec cp {} "$STAGE/results/" \; 2>/dev/null
note "total: $((SECONDS - START)) s"
tar -czf "$OUT/gpu_results.tar.gz" -C "$STAGE" logs results autotune summary.txt
cp "$SUMMARY" "$OUT/summary.txt"
rm -rf "$STAGE"
echo "wrote $OUT/summary.txt and $OUT/gpu_results.tar.gz"
