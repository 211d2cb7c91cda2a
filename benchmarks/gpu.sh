#!/usr/bin/env bash
# GPU benchmark: a random-weight SD 1.5-sized pipeline (512 px, 64x64 latents) in bf16 on one GPU.
#   bash benchmarks/gpu.sh           # on a GPU machine, about 4-6 minutes on one H100
#   bash benchmarks/gpu.sh --short   # about 3 minutes: fewer repeats, no torch.compile, one micro-batch size
#   bash benchmarks/gpu.sh --tiny    # dry run on CPU with the tiny random model (checks the script only)
# Uses the system's torch/transformers/peft/accelerate; wheels in .whl/ (e.g. diffusers) are installed into
# /tmp/site when a package is missing. Writes gpu.json, gpu.md (a table) and gpu.log to $OUT
# (default benchmarks/results) and prints the table.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="src:${PYTHONPATH:-}"

missing=""
for m in torch diffusers transformers peft accelerate importlib_metadata; do
  "$PY" -c "import $m" 2>/dev/null || missing="$missing $m"
done
if [ -n "$missing" ]; then
  echo "missing:$missing"
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="src:/tmp/site:${PYTHONPATH#src:}"
  fi
fi
"$PY" - <<'PYEOF' || { echo "required packages are missing; see above" | tee "$OUT/gpu.log"; exit 1; }
import importlib
bad = []
for m in ("torch", "diffusers", "transformers", "peft", "accelerate"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        bad.append(f"{m}: {type(e).__name__}: {e}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if bad:
    raise SystemExit("\n".join(bad))
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ "${1:-}" = "--tiny" ]; then
  ARGS=(--device cpu --model tiny-random --dtype fp32 --steps 4 --batch 2 --train-batches 2,4 --train-sweep
        --sweep-micro-batches 1 --flops --repeats 1 --epoch-repeats 1 --time-budget 300)
elif [ "${1:-}" = "--short" ]; then
  ARGS=(--device cuda --model sd15-random --dtype bf16 --steps 20 --batch 8 --train-batches 4 --train-sweep
        --sweep-micro-batches 2 --flops --repeats 2 --epoch-repeats 1 --time-budget 120)
else
  ARGS=(--device cuda --model sd15-random --dtype bf16 --steps 20 --batch 8 --train-batches 4,8 --train-sweep
        --sweep-micro-batches 3 --flops --compile --repeats 3 --epoch-repeats 2 --time-budget 270)
fi
set -o pipefail
timeout "${GPU_BENCH_TIMEOUT:-400}" "$PY" -u benchmarks/perf.py "${ARGS[@]}" --out "$OUT/gpu.json" 2>&1 \
  | grep --line-buffered -v -e '^\[transformers\]' -e 'should be kept in float32' | tee "$OUT/gpu.log"
rc=$?
"$PY" -c "import json, sys; sys.path.insert(0, 'benchmarks'); import perf; print(perf.table(json.load(open(sys.argv[1]))))" \
  "$OUT/gpu.json" > "$OUT/gpu.md" 2>/dev/null && cat "$OUT/gpu.md"
echo "exit $rc; files in $OUT: gpu.json gpu.md gpu.log"
exit $rc
