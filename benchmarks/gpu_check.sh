#!/usr/bin/env bash
# syncbn's GPU check: one unattended run on a machine with a CUDA GPU.
#
#   OUT=/path/to/empty/folder bash benchmarks/gpu_check.sh      # (OUT defaults to ./gpu-check-out)
#
# (from the repository root, or anywhere: it runs in the checkout it belongs to)
#
# Needs: python3 with torch (CUDA), triton, pytest and pytest-timeout; timm is optional. Nothing
# is installed and nothing is fetched: syncbn runs from this checkout (PYTHONPATH=src).
# Without python3, torch or a CUDA device it stops within seconds with exit status 2, saying so.
#
# The steps, each `python3 benchmarks/gpu_check.py --only SECTIONS` (the driver; its docstring
# describes every section, target and tolerance) under `timeout`, in this order:
#   1. env           45 s   versions, device, syncbn's kernels; stops the run without CUDA
#   2. cuda_tests   110 s   every CUDA-marked test (pytest -m cuda tests/)
#   3. dataparallel  40 s   syncbn.DataParallel's GPU tests (tests/test_parallel.py)
#   4. layers       170 s   gradients and outputs of every syncbn path vs float64 at ResNet-50
#                           sizes; host syncs; running_var error at mean/std 1e4; the per-layer
#                           timing table (bf16 channels_last first; stops in time for the rest);
#                           kernel counts; CUDA-graph capture/replay; timm efficientnet_b0 step
#   5. gloo          75 s   2 ranks on the one GPU over gloo: every path vs float64 on shards
#                           [5, 3] and [4, 0]; a rank that skips a layer raises on every rank
#   6. path_tests    60 s   the CUDA tests again with SYNCBN_KERNEL=triton and =cuda
#   7. resnet      the rest a compiled ResNet-50 training step (only with >= 60 s left)
# All steps together stop within GPU_CHECK_SECONDS (default 520 s, under the device's 9
# minutes): a step gets at most what is left, and one that would get less than its minimum is
# skipped and recorded as such. A timed-out step keeps everything it had measured.
#
# What comes back in $OUT (2 files, 3 while a write is in flight):
#   summary.json    every number and verdict, rewritten after each; `steps` (status and reason
#                   per section), `verdicts`, `recommended_default` (the fastest syncbn path
#                   whose running_var error is <= 1e-6), `exit_status`
#   gpu_check.log   everything: each step's output, pytest's, tracebacks
# stdout shows each verdict as it comes, and the summary at the end.
#
# Exit status: 0 every correctness check passed; 1 one failed (summary.json says which:
# `failed_correctness_steps`); 2 no python3, torch or CUDA device. Timing targets do not change it.
#
# GPU_CHECK_SMOKE=1 runs every step with --cpu-smoke (CPU, tiny shapes; numbers mean nothing).
set -u
OUT="${OUT:-./gpu-check-out}"
TOTAL="${GPU_CHECK_SECONDS:-520}"
SMOKE=""
[ -n "${GPU_CHECK_SMOKE:-}" ] && SMOKE="--cpu-smoke"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 2  # the repository root
DRIVER=benchmarks/gpu_check.py
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + TOTAL))

say() { echo "$*" | tee -a "$LOG"; }

if ! command -v python3 >/dev/null; then
    say "no python3 on PATH: nothing can run"
    printf '{"exit_status": 2, "reason": "no python3 on PATH"}\n' >"$OUT/summary.json"
    exit 2
fi

# step SECTIONS LIMIT [MINIMUM]: the driver on SECTIONS, under min(LIMIT, time left); skipped
# when less than MINIMUM (default 20 s) is left. Returns the driver's exit status.
step() {
    local sections="$1" limit="$2" minimum="${3:-20}"
    local left=$((DEADLINE - SECONDS - 10))  # 10 s kept for the summary at the end
    local secs=$((limit < left ? limit : left))
    if [ "$secs" -lt "$minimum" ]; then
        python3 "$DRIVER" --out "$OUT" --only "$sections" \
            --mark-skipped "no time left: $left s of GPU_CHECK_SECONDS=$TOTAL, needs $minimum s"
        return 0
    fi
    say "== step $sections (limit ${secs} s, $SECONDS s elapsed)"
    timeout -k 5 "$secs" python3 "$DRIVER" --out "$OUT" --only "$sections" \
        --budget $((secs - 10)) $SMOKE 2>>"$LOG"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "== $sections: killed at its limit of $secs s"
        python3 "$DRIVER" --out "$OUT" --only "$sections" --mark-timeout "$secs"
    fi
    return "$rc"
}

say "== syncbn GPU check: $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), OUT=$OUT"
if ! step env 45 1; then
    say "== stopping: see the env step above (no torch or no CUDA device)"
    python3 "$DRIVER" --out "$OUT" --finish
    exit 2
fi
step cuda_tests 110
step dataparallel 40
step gradients,nosync,numerics,timing,counts,graphs,timm 170
step gloo 75
step path_tests 60
step resnet 9999 60
python3 "$DRIVER" --out "$OUT" --finish
exit $?
