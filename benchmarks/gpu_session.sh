#!/usr/bin/env bash
# The GPU checks no CPU machine can run, as one prepared call (a lent GPU's time is short):
#   1. the tests marked gpu (PyTorch CUDA fp16 runner, CUDA-event timing; TensorRT where installed)
#   2. benchmarks/latency.py on PyTorch CUDA fp16 (CUDA graphs), yolov5s and yolov5x, batch 1/32
#   3. --round-to auto's alignment profile on the GPU (compile yolov5s, fp16, --latency-runtime torch)
#   4. benchmarks/latency.py for yolov8x
#   5. a short fine-tune on CUDA (AMP, no distillation): the embedded yolov5n, MACs 0.5, 2 epochs
# Each step's output goes to OUTDIR/gpu_session.log; result files are packed into
# OUTDIR/gpu_results.tar after every step, so a run cut short still returns what it finished.
#
#   bash benchmarks/gpu_session.sh OUTDIR [STEP...]     (steps: tests latency alignment yolov8x finetune)
#
# Needs the project's Python dependencies importable (pip install -e . on a GPU machine).
set -u
OUTDIR=${1:?usage: gpu_session.sh OUTDIR [STEP...]}
shift
STEPS=${*:-tests latency alignment yolov8x finetune}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR" runs/gpu
LOG="$OUTDIR/gpu_session.log"

pack() {
    # small files only: the pruned models themselves stay behind
    find benchmarks/results -name 'latency_gpu*' -print0 >"$OUTDIR/.files"
    find runs/gpu ~/.cache/yoloprune \( -name '*.json' -o -name '*.md' \) -print0 >>"$OUTDIR/.files"
    tar -cf "$OUTDIR/gpu_results.tar" --null -T "$OUTDIR/.files" 2>/dev/null
    rm -f "$OUTDIR/.files"
}

run_step() {
    local name=$1
    shift
    echo "== $(date -u +%T) $name: $*"
    local start=$SECONDS
    "$@"
    echo "== $name: exit $? after $((SECONDS - start)) s"
    pack
}

{
    echo "== $(date -u) on $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0))"
    for step in $STEPS; do
        case $step in
        tests)
            run_step tests $PY -m pytest -q -m gpu -p no:cacheprovider tests ;;
        latency)
            run_step latency $PY benchmarks/latency.py --runtime torch --cuda-graph \
                --batches 1,32 --models yolov5s,yolov5x --stem latency_gpu ;;
        alignment)
            run_step alignment $PY -m yoloprune compile yolov5s.yaml --macs 0.5 \
                --precision fp16 \
                --latency-runtime torch --no-bench --out runs/gpu/compile_yolov5s ;;
        yolov8x)
            run_step yolov8x $PY benchmarks/latency.py --runtime torch --cuda-graph \
                --batches 1,32 --models yolov8x --stem latency_gpu_yolov8x ;;
        finetune)
            run_step data $PY -m yoloprune data --out runs/data/shapes
            run_step finetune $PY -m yoloprune compile graphs/weights/yolov5n-shapes.pt \
                --macs 0.5 --data runs/data/shapes/data.yaml --epochs 2 --no-bench \
                --out runs/gpu/compile_finetune ;;
        *)
            echo "unknown step $step (tests, latency, alignment, yolov8x, finetune)"
            exit 2 ;;
        esac
    done
    echo "== $(date -u +%T) done"
} 2>&1 | tee "$LOG"
