#!/usr/bin/env bash
# One call that builds, checks and times syncbn on a GPU machine (for a session lent a device).
#
#   bash benchmarks/gpu_check.sh            # writes logs to $OUT (or ./gpu-check-out)
#
# Steps, each logged to its own file, each bounded by `timeout`, all run even if one fails:
#   1. environment: nvidia-smi, torch/CUDA versions, GPU count
#   2. the package from this checkout (PYTHONPATH=src: the device has no network; its image
#      has torch, pytest, pytest-timeout and hypothesis)
#   3. CUDA tests: every test marked `cuda` (exactness, layers, misuse on CUDA tensors)
#   4. the Triton backend (issue 13), benchmarks/gpu_triton.py in five processes (a failed CUDA
#      graph capture cannot spoil the others): no-host-sync, kernel/copy counts per direction,
#      numerics at mean/std = 1e4, the per-layer table (triton vs torch.nn.SyncBatchNorm vs
#      plain BN vs syncbn's ATen path, float32/bf16/fp16, contiguous/channels_last; --budget
#      stops it before its limit); CUDA graphs; torch.compile(mode="reduce-overhead"); 2 ranks
#      over gloo on the one GPU; a compiled ResNet-50 training step (bf16 autocast,
#      channels_last): syncbn synchronizing vs plain BatchNorm (target <= 1.02x)
#   5. the CUDA tests again with SYNCBN_KERNEL=triton (tests/conftest.py pins the kernel
#      fixture to it), and the syncbn.DataParallel GPU tests
#   6. syncbn check: NCCL over every GPU when there are >= 2, else 2 ranks sharing the one GPU
#      over gloo; a float64 reference comparison
# The limits add up to 480 s. Read first: triton-gpu.log (its table's last line is the verdict
# on <= 0.8x torch.nn.SyncBatchNorm), then triton-resnet.log (its last lines:
# triton/plain against <= 1.02x), triton-graphs.log and triton-compile.log.
# Exit status: the number of steps that failed.
set -u
OUT="${OUT:-./gpu-check-out}"
mkdir -p "$OUT"
failed=0
step() {  # step NAME SECONDS COMMAND...
    local name="$1" secs="$2"; shift 2
    echo "== $name (limit ${secs}s)"
    if timeout "$secs" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok"; tail -n 5 "$OUT/$name.log"
    else
        echo "   FAILED (exit $?)"; tail -n 30 "$OUT/$name.log"; failed=$((failed + 1))
    fi
}
step env 10 bash -c 'nvidia-smi; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count())"'
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step import 10 python -c "import syncbn, torch; print(syncbn.__version__, torch.__version__)"
step triton-gpu 105 python benchmarks/gpu_triton.py --only nosync,counts,numerics,table --budget 85
step triton-graphs 35 python benchmarks/gpu_triton.py --only graphs
step triton-compile 55 python benchmarks/gpu_triton.py --only compile
step triton-gloo 35 python benchmarks/gpu_triton.py --only gloo
step triton-resnet 130 python benchmarks/gpu_triton.py --only resnet --budget 100
step cuda-tests 35 python -m pytest -q -x -m cuda -p no:cacheprovider tests/test_distributed.py
step triton-cuda-tests 45 env SYNCBN_KERNEL=triton python -m pytest -q -m cuda -p no:cacheprovider tests/test_distributed.py
step dataparallel-cuda 10 python -m pytest -q -p no:cacheprovider tests/test_parallel.py -k cuda
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${gpus:-0}" -ge 2 ]; then
    step check 10 torchrun --nproc-per-node "$gpus" -m syncbn check
else
    step check 10 python -m syncbn check --world-size 2 --device cuda --backend gloo
fi
echo "== $failed step(s) failed; logs in $OUT"
exit "$failed"
