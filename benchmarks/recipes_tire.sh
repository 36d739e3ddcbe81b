#!/usr/bin/env bash
# Every training recipe on tire_small with the real Lite0 package teacher (README "Trained models"): rd4ad and ader
# (Reverse Distillation), stfpm and anomalib (STFPM), EPOCHS epochs each at the recipes' 256 px, one line per run
# (metrics, run time, the epoch the exported weights are from, the values the run changed from its recipe).
# Run alone on the machine: EPOCHS=20 bash benchmarks/recipes_tire.sh
# A smoke run (minutes; its numbers mean nothing): EPOCHS=1 SIZE=64 bash benchmarks/recipes_tire.sh
cd "$(dirname "$0")/.."
OUT=$(mktemp -d /tmp/anomaly-bench-recipes.XXXX)
EPOCHS=${EPOCHS:-20}
PYTHON=${PYTHON:-.venv/bin/python}
TIRE='datasets=[{name: tire_small, format: mvtec, root: data/tire_small}]'
COMMON=(--set "$TIRE" --set backbone.name=tf_efficientnet_lite0 --set backbone.layers=[] --set backbone.weights=package
        --set training.gpus_per_worker=0 --set training.cpus_per_worker=1 --set training.validate_every_n_epochs=10
        --set training.epochs=$EPOCHS ${SIZE:+--set preprocess.resize=$SIZE --set preprocess.crop=$SIZE})
run() { config=$1 recipe=$2
  /usr/bin/time -f "$recipe wall %e s" env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $PYTHON -m jobs.train --config $config \
    "${COMMON[@]}" --set training.recipe=$recipe --wandb off --run-name $recipe --set output_dir=$OUT > $OUT/$recipe.log 2>&1
  tail -1 $OUT/$recipe.log
  python3 - "$OUT/$recipe" <<'PY'
import json, sys
run = sys.argv[1]
s = json.load(open(f"{run}/summary.json")); c = s["categories"][0]; m = c["metrics"]
t = json.load(open(f"{run}/tire_small/tire/model.json"))["training"]
print(run.split("/")[-1], "img %.4f pix %.4f aupro %.4f" % (m["image_auroc"], m["pixel_auroc"], m["aupro"]),
      "run", s["timings"]["total_s"], "s, train", c["timings"]["train_s"], "s; weights of epoch", t["weights_epoch"],
      "of", t["epochs_completed"], "; changed", {k: v["config"] for k, v in t["recipe"]["changed"].items()})
PY
}
run configs/reverse_distillation.yaml rd4ad
run configs/reverse_distillation.yaml ader
run configs/stfpm.yaml stfpm
run configs/stfpm.yaml anomalib
