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
#   4. per-layer timing on one GPU: syncbn vs torch.nn.SyncBatchNorm vs plain BN, and the
#      no-host-sync check of the forward (benchmarks/layer.py)
#   5. syncbn check: NCCL over every GPU when there are >= 2, else 2 ranks sharing the one GPU
#      over gloo; a float64 reference comparison
#   6. the Triton backend (issue 13) on the GPU: the CUDA tests and the per-layer timing again
#      with SYNCBN_KERNEL=triton (launch counts and no-host-sync included), and the
#      syncbn.DataParallel GPU tests
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
step env 60 bash -c 'nvidia-smi; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count())"'
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step import 60 python -c "import syncbn, torch; print(syncbn.__version__, torch.__version__)"
step cuda-tests 180 python -m pytest -q -m cuda -p no:cacheprovider tests/test_distributed.py
step layer 90 python benchmarks/layer.py --device cuda
step triton-cuda-tests 150 env SYNCBN_KERNEL=triton python -m pytest -q -m cuda -p no:cacheprovider tests/test_distributed.py
step triton-layer 90 env SYNCBN_KERNEL=triton python benchmarks/layer.py --device cuda
step dataparallel-cuda 60 python -m pytest -q -p no:cacheprovider tests/test_parallel.py -k cuda
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${gpus:-0}" -ge 2 ]; then
    step check 60 torchrun --nproc-per-node "$gpus" -m syncbn check
else
    step check 60 python -m syncbn check --world-size 2 --device cuda --backend gloo
fi
echo "== $failed step(s) failed; logs in $OUT"
exit "$failed"
