#!/usr/bin/env bash
# make gpu-check [OUT=DIR]: the whole GPU verification in one command, for one short GPU window (about 10 minutes
# on an H100/H200 with torch, triton, a CUDA toolkit, ninja and pytest preinstalled; no network: no venv, no
# pip). In order, each with its own time limit (PART_LIMITS below; docs/gpu.md "Verify on your GPU" lists them):
#   build           builds the extension in place against the installed torch (MAX_JOBS = cores, the GPU's arch)
#   info            `python -m stabkernels info` (must say CUDA kernels: yes)
#   tests           every CUDA and Triton test and tests/test_gpu.py (no host sync, CUDA graphs); JUnit XML
#   bench           every family's kernel benchmark on the GPU with the torch.compile column (rewritten after
#                   every case, so a run cut short keeps what it measured)
#   compiled-steps  each optimizer's step eager and compiled (graph breaks), also rewritten as it goes
# Every file it writes goes to OUT (default bench/results): <gpu>-gpu-check.log (everything printed),
# <gpu>-env.txt, <gpu>-info.txt, <gpu>-junit.xml, <gpu>.{csv,md,png}, <gpu>-compiled-steps.{csv,md}.
# A part that fails or runs out of time does not stop the later ones; the exit status is 0 when build, info and
# tests passed in time and the benchmarks did not fail (one cut short by its limit is reported as partial).
# Limits end a part with SIGINT (timeout -s INT), so pytest still prints its failure summary and
# writes the JUnit file, and the benchmarks write what they have; SIGKILL follows KILL_AFTER seconds later.
# Without a CUDA device it prints one line and exits 0.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/results}
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
cd "$ROOT"
PY=${PYTHON:-python3}

# Seconds per part. Sum (440) + 5 x KILL_AFTER (25) = 465 s at most, under the 8 minutes (480 s) the window
# leaves after the machine starts; tests/test_gpu_check_script.py checks the sum and the table in docs/gpu.md.
PART_LIMITS="build=140 info=10 tests=120 bench=110 compiled-steps=60"
KILL_AFTER=5
limit() { local kv; for kv in $PART_LIMITS; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

probe=$("$PY" - 2>/dev/null <<'EOF'
import re, torch
if torch.cuda.is_available():
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    print(name, "%d.%d" % torch.cuda.get_device_capability())
EOF
)
if [ -z "$probe" ]; then
  echo "gpu-check: no CUDA device (or no torch for $PY), nothing to do"
  exit 0
fi
read -r NAME ARCH <<<"$probe"
mkdir -p "$OUT"
LOG=$OUT/$NAME-gpu-check.log
exec > >(tee "$LOG") 2>&1

# Measurement parts: one that runs out of time has still written what it measured (reported as partial, not a
# failure); every other part must finish in time with status 0.
MEASUREMENTS="bench compiled-steps"
status=0
summary=()
part() {  # part <name> <command...>: runs the command under its limit (a shell function keeps its own limits)
  local name=$1 lim; shift
  lim=$(limit "$name")
  echo "== $name (limit ${lim}s) $(date +%T)"
  local t0=$SECONDS rc
  if declare -F "$1" >/dev/null; then "$@"; else timeout -s INT -k "$KILL_AFTER" "$lim" "$@"; fi
  rc=$?
  local took=$((SECONDS - t0)) what=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    if [[ " $MEASUREMENTS " == *" $name "* ]]; then what="partial(time limit)"; else what="TIMEOUT"; status=1; fi
  elif [ $rc -ne 0 ]; then
    what="FAILED(rc=$rc)"; status=1
  fi
  echo "== $name: $what in ${took}s"
  summary+=("$name $what ${took}s;")
}

TEST_SHARDS=${TEST_SHARDS:-4}
run_tests() {
  local lim files=() i j rc=0 n=0 pids=()
  lim=$(( $(limit tests) - 2 * KILL_AFTER ))
  mapfile -t files < <(ls -S tests/test_*.py | grep -v '/test_build.py$')
  rm -f "$OUT/$NAME-junit-"*.xml "$OUT/$NAME-junit.xml"
  for ((i = 0; i < TEST_SHARDS; i++)); do
    local mine=()
    for ((j = i; j < ${#files[@]}; j += TEST_SHARDS)); do mine+=("${files[j]}"); done
    [ ${#mine[@]} -gt 0 ] || continue
    n=$((n + 1))
    ( timeout -s INT -k "$KILL_AFTER" "$lim" env STABKERNELS_REQUIRE_EXT=1 STABKERNELS_REQUIRE_CUDA_BUILD=1 \
        "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfEs --durations=5 \
        --junitxml="$OUT/$NAME-junit-$i.xml" -k "cuda or triton or gpu" "${mine[@]}" > "$OUT/$NAME-tests-$i.log" 2>&1
      echo $? > "$OUT/.rc-$i" ) &
    pids+=($!)
  done
  wait "${pids[@]}"  # by pid: a bare wait would also wait for the log's tee
  for ((i = 0; i < n; i++)); do
    local r; r=$(cat "$OUT/.rc-$i" 2>/dev/null || echo 1); rm -f "$OUT/.rc-$i"
    echo "-- tests shard $i (rc=$r): $OUT/$NAME-tests-$i.log"
    cat "$OUT/$NAME-tests-$i.log"
    # 5: no test of this shard's files is selected; 124/137: the shard ran out of time
    case $r in 0|5) ;; *) rc=$r ;; esac
  done
  "$PY" - "$OUT/$NAME-junit.xml" "$OUT/$NAME-junit-"*.xml <<'EOF_PY' || rc=1
import sys, xml.etree.ElementTree as ET
out, parts = sys.argv[1], sys.argv[2:]
root = ET.Element("testsuites")
for p in parts:
    try:
        r = ET.parse(p).getroot()
    except (OSError, ET.ParseError) as e:  # a shard killed before it wrote its file
        print(f"tests: {p} unreadable ({e})")
        continue
    root.extend(r.iter("testsuite") if r.tag == "testsuites" else [r])
n = sum(int(s.get("tests", 0)) for s in root)
for k in ("tests", "failures", "errors", "skipped"):
    root.set(k, str(sum(int(s.get(k, 0)) for s in root)))
ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
print(f"tests: {root.get('tests')} run, {root.get('failures')} failed, {root.get('errors')} errors, "
      f"{root.get('skipped')} skipped; JUnit XML: {out}")
sys.exit(0 if n else 1)
EOF_PY
  return $rc
}

echo "gpu-check on $NAME (sm_${ARCH/./}), $(nproc) cores, results in $OUT"
{
  date -u
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
  nvidia-smi 2>&1 | head -20
  nvcc --version 2>&1 | tail -2
  git log -1 --format='commit %H %s' 2>/dev/null
} > "$OUT/$NAME-env.txt"
cat "$OUT/$NAME-env.txt"

part build env STABKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" CXXFLAGS=-g0 \
  "$PY" setup.py -q build_ext --inplace
part info bash -c "set -o pipefail; '$PY' -m stabkernels info | tee '$OUT/$NAME-info.txt' && grep -q 'CUDA kernels: yes' '$OUT/$NAME-info.txt'"
# Every test whose id names cuda, triton or gpu (the CUDA/Triton parametrisations; the triton-cpu ones skip
# without TRITON_INTERPRET) and tests/test_gpu.py, less tests/test_build.py (the no-GPU build checks CI runs;
# its glue compile alone takes minutes). The selection compiles about 135 Triton specialisations with 65
# distinct launchers (triton 3.6 builds each launcher with gcc): about 40 s of kernel compile plus about a
# second per launcher on one core, counted on CPU with `python tools/gpu_static_check.py capture --out build/launches.json --list`. So
# the test files are dealt, biggest first, to TEST_SHARDS pytest processes that share the GPU and run side by
# side; each writes its own log and JUnit file, merged into <gpu>-junit.xml at the end.
part tests run_tests
part bench "$PY" -m stabkernels bench --device cuda --compile --min-time 0.05 --name "$NAME" --out "$OUT"
part compiled-steps "$PY" -m stabkernels.benchmarks.compiled_steps --device cuda --min-time 0.1 --name "$NAME" \
  --out "$OUT"
echo "gpu-check: $([ $status -eq 0 ] && echo 'all parts passed' || echo 'NOT ALL PARTS PASSED'): ${summary[*]}"
echo "gpu-check: send back the folder $OUT (log, env, info, JUnit XML, benchmark tables)"
exit $status
