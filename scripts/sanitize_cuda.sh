#!/usr/bin/env bash
# Runs the CUDA kernels' tests under NVIDIA compute-sanitizer, one tool after another (needs a GPU and the built
# extension):
#
#   scripts/sanitize_cuda.sh                       # memcheck, racecheck, synccheck
#   scripts/sanitize_cuda.sh memcheck              # one tool
#   SANITIZE_K="logprobs and bfloat16" scripts/sanitize_cuda.sh racecheck   # narrow the tests (pytest -k)
#
# The tests are the impl="cuda" cases of the shared op suites (tests/ops/) and tests/ops/test_cuda.py, without the
# large CUDA-vs-Triton cross-checks (Triton kernels are not under test here, and racecheck is slow on big shapes).
# PyTorch's caching allocator is switched off so that memcheck sees each tensor's exact bounds (an out-of-bounds
# read inside a cached block would otherwise go unnoticed). Exit status: 0 when every tool reports no error.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS=("$@")
[ ${#TOOLS[@]} -eq 0 ] && TOOLS=(memcheck racecheck synccheck)

SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && SANITIZER="$d/bin/compute-sanitizer" && break
  done
fi
if [ -z "$SANITIZER" ]; then
  echo "sanitize_cuda: compute-sanitizer not found (put it on PATH or set CUDA_HOME)" >&2
  exit 2
fi
PY="${PYTHON:-python}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "sanitize_cuda: no CUDA device visible to torch; nothing to sanitize" >&2
  exit 2
fi
if ! "$PY" -c "import sys; from spa_kernels import _ext; sys.exit(0 if _ext.cuda_unavailable_reason() is None else 1)"; then
  echo "sanitize_cuda: the CUDA kernels are not usable: $("$PY" -m spa_kernels.info | grep -i cuda)" >&2
  exit 2
fi

TESTS=(tests/ops/test_logprobs.py tests/ops/test_spa_logprobs.py tests/ops/test_linear_logprobs.py
       tests/ops/test_linear_spa_logprobs.py tests/ops/test_cuda.py)
# Graph capture is left out: without the caching allocator, a capture's cudaFree is illegal (error 900).
SELECT="cuda and not triton and not cuda_graph${SANITIZE_K:+ and (${SANITIZE_K})}"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export SPA_KERNELS_AUTOTUNE=0  # no timing runs under the sanitizer

status=0
for tool in "${TOOLS[@]}"; do
  echo "== compute-sanitizer --tool $tool: pytest -k '$SELECT'"
  start=$SECONDS
  "$SANITIZER" --tool "$tool" --error-exitcode 86 --print-limit 20 --target-processes all \
    "$PY" -m pytest -q -p no:cacheprovider -m "gpu and not slow" -k "$SELECT" "${TESTS[@]}"
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "== $tool: clean ($((SECONDS - start)) s)"
  else
    echo "== $tool: FAILED (exit $rc; 86 = sanitizer errors, else pytest's status) ($((SECONDS - start)) s)"
    status=1
  fi
done
exit $status
