#!/usr/bin/env bash
# GPU benchmark on one GPU, random weights in bf16, end to end under 8 minutes (each part has a time budget and a
# hard timeout; a part that does not fit in memory is recorded and skipped):
#   1. SD 1.5's shapes at 512 px (benchmarks/perf.py): sampling vs StableDiffusionPipeline, DAG-DB
#      training (both x̂0 sources, timestep fractions, the small x̂0 decoder), micro-batch sweep, FLOPs / MFU;
#   2. SDXL (1024 px), SD3.5 Medium and FLUX.1-dev (512 px) at their full shapes (benchmarks/gpu_shapes.py):
#      sampling vs the diffusers pipeline, per step vs the guided call, per transition vs the LoRA forward +
#      backward, transitions/s and peak memory at micro-batch 1/2/4 with and without gradient checkpointing, and
#      what fits on 24 / 48 / 80 GB.
#   bash benchmarks/gpu.sh           # both parts, about 8 minutes on one H100
#   bash benchmarks/gpu.sh --short   # part 1 only, about 2.5 minutes
#   bash benchmarks/gpu.sh --tiny    # dry run on CPU with the tiny random models (checks the script only)
# Uses the system's torch/transformers/peft/accelerate; wheels in .whl/ (e.g. diffusers) are installed into
# /tmp/site when a package is missing. Writes gpu-sd15.json / .md, gpu-shapes.json / .md and gpu.log to $OUT
# (default benchmarks/results) and prints the tables.
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

MODE=${1:-full}
SHAPES_ARGS=(--device cuda --dtype bf16 --model-budget 80)
PERF_TIMEOUT=150 SHAPES_TIMEOUT=320
if [ "$MODE" = "--tiny" ]; then
  PERF_ARGS=(--device cpu --model tiny-random --dtype fp32 --steps 4 --batch 2 --train-batches 2,4 --train-sweep
             --sweep-micro-batches 1 --flops --repeats 1 --epoch-repeats 1 --time-budget 120)
  SHAPES_ARGS=(--tiny)
  PERF_TIMEOUT=240 SHAPES_TIMEOUT=240
else
  PERF_ARGS=(--device cuda --model sd15-random --dtype bf16 --steps 20 --batch 8 --train-batches 4,8 --train-sweep
             --sweep-micro-batches 2 --flops --repeats 2 --epoch-repeats 1 --time-budget 110 --sections sampling,training,flops)
fi
set -o pipefail
quiet() { grep --line-buffered -v -e '^\[transformers\]' -e 'should be kept in float32' -e 'passed to AutoencoderTiny'; }
: > "$OUT/gpu.log"
timeout "$PERF_TIMEOUT" "$PY" -u benchmarks/perf.py "${PERF_ARGS[@]}" --out "$OUT/gpu-sd15.json" 2>&1 \
  | quiet | tee -a "$OUT/gpu.log"
rc=$?
"$PY" -c "import json, sys; sys.path.insert(0, 'benchmarks'); import perf; print(perf.table(json.load(open(sys.argv[1]))))" \
  "$OUT/gpu-sd15.json" > "$OUT/gpu-sd15.md" 2>/dev/null && cat "$OUT/gpu-sd15.md"
if [ "$MODE" != "--short" ]; then
  timeout "$SHAPES_TIMEOUT" "$PY" -u benchmarks/gpu_shapes.py "${SHAPES_ARGS[@]}" --out "$OUT/gpu-shapes.json" 2>&1 \
    | quiet | tee -a "$OUT/gpu.log"
  rc2=$?
  [ $rc -eq 0 ] && rc=$rc2
  # the table again from the JSON, which holds every finished model even when the timeout stopped the run
  "$PY" -c "import json, sys; sys.path.insert(0, 'benchmarks'); import gpu_shapes as g; \
print(g.table(json.load(open(sys.argv[1]))))" "$OUT/gpu-shapes.json" > "$OUT/gpu-shapes.md" 2>/dev/null
fi
echo "exit $rc; files in $OUT: gpu-sd15.json gpu-sd15.md gpu-shapes.json gpu-shapes.md gpu.log"
exit $rc
