#!/usr/bin/env bash
# One GPU check for a machine with an NVIDIA GPU and only torch / torchvision / torchmetrics / pyarrow /
# scikit-learn installed (no ray, mlflow or dvc). Runs in a few minutes:
#   1. the memory-vs-depth benchmark (SSM step, input 784, width 1000, batch 128) on the device;
#   2. the exact implicit mode against phantom at equal gradient accuracy (memory_depth.py --mode accuracy);
#   3. the solver benchmark;
#   4. a short training of each experiment's DEQ and deepest explicit variant (benchmarks/train_check.py);
# and prints one JSON summary as its last line.
#   bash benchmarks/gpu_check.sh               # CUDA when present, else CPU
#   bash benchmarks/gpu_check.sh --device cpu  # force CPU (smaller sizes so it stays short)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --device cpu|cuda|auto)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ "$DEVICE" = auto ]; then
  DEVICE=$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi
OUTDIR=${OUT:-out/gpu_check}
mkdir -p "$OUTDIR"
if [ "$DEVICE" = cuda ]; then
  MEM_ARGS=(--repeats 3)
  ACC_ARGS=()
  SOLVER_ARGS=(--width 1000 --batch 128)
  TRAIN_ARGS=()
else  # CPU: the same code paths at a size that finishes in a few minutes on 2 cores
  MEM_ARGS=(--in-dim 256 --width 256 --batch 64 --iters 10 100 --repeats 1)
  ACC_ARGS=(--repeats 3)
  SOLVER_ARGS=(--width 128 --batch 32 --repeats 1)
  TRAIN_ARGS=(--small)
fi
echo "== memory vs depth ($DEVICE)" >&2
$PY benchmarks/memory_depth.py --device "$DEVICE" "${MEM_ARGS[@]}" | tee "$OUTDIR/memory_depth.jsonl" >&2
echo "== exact vs phantom at equal accuracy ($DEVICE)" >&2
$PY benchmarks/memory_depth.py --mode accuracy --device "$DEVICE" "${ACC_ARGS[@]}" | tee "$OUTDIR/equal_accuracy.jsonl" >&2
echo "== solvers ($DEVICE)" >&2
$PY benchmarks/solvers.py --device "$DEVICE" "${SOLVER_ARGS[@]}" | tee "$OUTDIR/solvers.jsonl" >&2
echo "== short trainings ($DEVICE)" >&2
$PY benchmarks/train_check.py --device "$DEVICE" "${TRAIN_ARGS[@]}" | tee "$OUTDIR/train_check.jsonl" >&2
$PY - "$OUTDIR" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def last(name):
    lines = [json.loads(l) for l in (out / name).read_text().splitlines() if l.strip()]
    return lines[-1]["summary"], [l for l in lines if "summary" not in l]
mem, _ = last("memory_depth.jsonl")
acc, _ = last("equal_accuracy.jsonl")
sol, _ = last("solvers.jsonl")
train, rows = last("train_check.jsonl")
print(json.dumps({"gpu_check": {"memory_depth": mem, "equal_accuracy": acc, "solvers": sol, "training": train}}))
PYEOF
