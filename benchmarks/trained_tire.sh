#!/usr/bin/env bash
# Trained models beside PatchCore on tire_small with the real Lite0 package teacher (docs/BENCHMARKS.md):
# PatchCore (demo settings), Reverse Distillation (50 epochs), STFPM (30 epochs), the Lite0 + Lite1 ensemble,
# all at 256 -> 224, then jobs.compare. Run alone on the machine: bash benchmarks/trained_tire.sh
# One training thread: on 2 cores the run's evaluator keeps the other CPU (jobs.train refuses 2 + 1).
cd "$(dirname "$0")/.."
OUT=$(mktemp -d /tmp/anomaly-bench-trained.XXXX)
TIRE='datasets=[{name: tire_small, format: mvtec, root: data/tire_small}]'
TEACHER=(--set backbone.name=tf_efficientnet_lite0 --set backbone.layers=[] --set backbone.weights=package
         --set preprocess.resize=256 --set preprocess.crop=224 --set training.gpus_per_worker=0
         --set training.cpus_per_worker=1 --set training.validate_every_n_epochs=10)
timed() { name=$1; shift
  /usr/bin/time -f "$name wall %e s" env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m "$@" \
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
timed reverse_distillation jobs.train --config configs/reverse_distillation.yaml --set "$TIRE" "${TEACHER[@]}" --set training.epochs=50
timed stfpm jobs.train --config configs/stfpm.yaml --set "$TIRE" "${TEACHER[@]}" --set training.epochs=30
timed ensemble jobs.benchmark --config configs/ensemble_lite.yaml
.venv/bin/python -m jobs.compare $OUT/patchcore $OUT/ensemble $OUT/reverse_distillation $OUT/stfpm --out $OUT > $OUT/compare.log 2>&1
sed -n '/## image_auroc/,/## pixel_ap/p' $OUT/comparison.md
grep -h "epoch .*/" $OUT/reverse_distillation.log $OUT/stfpm.log | grep "AUROC" | cut -c25-
