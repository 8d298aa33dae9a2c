#!/usr/bin/env bash
# make gpu-check: the whole GPU verification in one command, for a machine with an NVIDIA GPU and torch,
# triton and a CUDA toolkit preinstalled (no network: no venv, no pip). It
#   1. builds the extension in place against the installed torch (MAX_JOBS = cores, the visible GPU's arch),
#   2. prints `info` (must say CUDA kernels: yes),
#   3. runs every CUDA and Triton test, the no-sync and CUDA-graph tests (tests/test_gpu.py),
#   4. runs the kernel benchmark on the GPU with the torch.compile column and the copy bandwidth,
#   5. times each optimizer's step eager and compiled (graph breaks),
# and writes bench/results/<gpu>.{csv,md,png}, <gpu>-compiled-steps.{csv,md} and <gpu>-gpu-check.log.
# Each part has its own time limit so the whole run stays under 8 minutes; a failing part does not stop
# the later ones, and the exit status says whether all passed. Without a GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu-check: $PY cannot import torch (set PYTHON=/path/to/python): no GPU check possible here."
  exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA GPU visible to torch $("$PY" -c 'import torch; print(torch.__version__)'): nothing to check."
  exit 0
fi

NAME=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
OUT=bench/results
LOG=$OUT/$NAME-gpu-check.log
mkdir -p "$OUT"
status=0
part() {  # part <title> <seconds> <command...>
  local title=$1 limit=$2; shift 2
  echo "== $title (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $title: rc=$rc in $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
}

exec > >(tee "$LOG") 2>&1
echo "gpu-check on $NAME (sm_${ARCH/./}), $(nproc) cores, $("$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1)"
part build 180 env STABKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" CXXFLAGS=-g0 \
  "$PY" setup.py -q build_ext --inplace
part info 30 "$PY" -m stabkernels info
# every test whose id names cuda or triton (the CUDA/Triton parametrisations), plus the GPU-only file
part tests 180 env STABKERNELS_REQUIRE_EXT=1 STABKERNELS_REQUIRE_CUDA_BUILD=1 "$PY" -m pytest -q -p no:cacheprovider \
  -o addopts="" -rfEs tests -k "cuda or triton or gpu" --durations=15
part bench 120 "$PY" -m stabkernels bench --device cuda --compile --min-time 0.1 --name "$NAME" --out "$OUT"
part compiled-steps 75 "$PY" -m stabkernels.benchmarks.compiled_steps --device cuda --name "$NAME" --out "$OUT"
echo "gpu-check: $([ $status -eq 0 ] && echo all parts passed || echo SOME PARTS FAILED), log in $LOG"
exit $status
