#!/usr/bin/env bash
# One prepared session on a lent GPU machine (at most 9 minutes; 8 files come back), most important first:
#   1. build the C++ extension in the background (the GPU tests compare against it)
#   2. gpu_check.py: bit-identity on the GPU, kernel vs D2D copy (BLOCK x warps sweep),
#      pinned transfers, end-to-end patch vs min(disk, H2D)
#   3. the GPU-marked tests
#   4. gpu_profile.py: host rates and where one GPU (and one CPU) patch spends its time
#   5. bench_staging.py: the engine's host side on that machine's cores (mmap vs pread staging,
#      the GPU configuration on a CPU stand-in vs the CPU path)
#   6. bench_batch.py on the machine's CPU cores (cpp) and on the GPU (triton: a fused GPU group)
#   7. gpu_summary.py: every number above against the target docs/benchmarks.md states, one table
# The GPU tests include tests/test_device.py's CUDA cases (the device interface's contract, the
# same cases the asynchronous stand-in passes on CPU-only machines) and tests/test_engine_gpu.py.
# Every step has its own timeout and the whole script a deadline (DEADLINE_S), so a
# slow step skips the later ones instead of losing all output. Logs and JSON go to $OUT.
#
#     bash benchmarks/gpu_session.sh            # on the device machine, from the repo root
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-./gpu_session_out}
mkdir -p "$OUT"
START=$SECONDS
DEADLINE_S=${DEADLINE_S:-540}
PY=${PY:-python3}
log="$OUT/session.log"

exec 3>&1  # the console, whatever a step's output is redirected to
say() { echo "[$((SECONDS - START))s] $*" | tee -a "$log" >&3; }
left() { echo $((DEADLINE_S - (SECONDS - START))); }
step() {  # step NAME SECONDS CMD...: run CMD with a timeout, unless the deadline is too close
    local name=$1 limit=$2; shift 2
    if [ "$(left)" -lt 30 ]; then say "SKIP $name (deadline)"; return; fi
    [ "$limit" -gt "$(left)" ] && limit=$(left)
    say "START $name (limit ${limit}s)"
    timeout "$limit" "$@"
    say "END $name rc=$?"
}

{ nvidia-smi -L; nproc; free -g | head -2; df -h /tmp | tail -1
  $PY -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} 2>&1 | tee -a "$log"

BENCH_DIR=/tmp/rf_bench_batch
BENCH_PARAMS=${BENCH_PARAMS:-0.5e9}
# In the background, while the GPU is busy: the extension, then bench_batch's models
# (bench_batch reuses them when it finds them).
(MAX_JOBS=8 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; echo "build rc=$?" >>"$OUT/build.log"
 $PY benchmarks/bench_batch.py build --root $BENCH_DIR --params "$BENCH_PARAMS" --shard-bytes 1e9 --n 8 \
     >/dev/null 2>>"$OUT/build.log"
 echo "bench models rc=$? at $((SECONDS - START))s" >>"$OUT/build.log") &
build_pid=$!

# 1M elements per identity case (4M took 50 s in the first session and found nothing)
step gpu_check 170 $PY benchmarks/gpu_check.py --out "$OUT" --ckpt-gb 1.5 --check-elems 1048613 --budget-s 160 >>"$log" 2>&1
wait $build_pid
say "$(grep rc= "$OUT/build.log" | tr '\n' ' ')"
step pytest_gpu 90 $PY -m pytest -m gpu tests/ -q -x -p no:cacheprovider -o addopts="" >"$OUT/pytest_gpu.log" 2>&1
tail -3 "$OUT/pytest_gpu.log" | tee -a "$log"
step gpu_profile 75 $PY benchmarks/gpu_profile.py --gb 1.5 --devices cuda,cpu --top 12 >"$OUT/profile.txt" 2>&1
step staging 90 $PY benchmarks/bench_staging.py --params 1.3e9 --rounds 3 --root /tmp/rf_staging \
    --json "$OUT/staging.json" >>"$log" 2>&1
rm -rf /tmp/rf_staging

# One bench_batch round took ~100 s on each backend there (N=1 and 8, with 8 separate
# CLI processes on the CPU); the times are written to the JSON after every round.
bench=(benchmarks/bench_batch.py --params "$BENCH_PARAMS" --ns 1,8 --rounds "${BENCH_ROUNDS:-2}" --dir $BENCH_DIR)
step batch_cpu 150 $PY "${bench[@]}" --backend cpp --separate-cli --json "$OUT/batch_cpu.json" >>"$log" 2>&1
step batch_gpu 150 $PY "${bench[@]}" --backend triton --device cuda --json "$OUT/batch_gpu.json" >>"$log" 2>&1
rm -rf $BENCH_DIR
# At most 8 files come back from the device: fold the build log into the session log.
{ echo "== build.log (tail)"; tail -5 "$OUT/build.log"; } >>"$log" && rm -f "$OUT/build.log"
# Last and outside the deadline (it only reads the JSON above): the numbers against their targets.
$PY benchmarks/gpu_summary.py "$OUT" 2>&1 | tee -a "$log" >&3
say "done"
