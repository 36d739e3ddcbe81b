#!/usr/bin/env bash
# New methods and the feature cache on tire_small (docs/BENCHMARKS.md): six demo-config runs and an ensemble, one line each.
# Run alone on the machine: bash benchmarks/new_methods_tire.sh
cd "$(dirname "$0")/.."
OUT=$(mktemp -d /tmp/anomaly-bench-methods.XXXX)  # runs never reuse a folder: a fresh one each time
run() { name=$1; shift
  /usr/bin/time -f "$name wall %e s" env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m jobs.benchmark --config ${CONFIG:-configs/demo.yaml} --categories tire --wandb off --run-name $name --set output_dir=$OUT "$@" > $OUT/$name.log 2>&1
  tail -1 $OUT/$name.log
  python3 - "$OUT/$name/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); c = s["categories"][0]; m = c["metrics"]
members = {k.split("/")[0]: round(v, 4) for k, v in m.items() if k.endswith("/image_auroc")}
print(sys.argv[1].split("/")[-2], "img %.4f pix %.4f aupro %.4f" % (m["image_auroc"], m["pixel_auroc"], m["aupro"]),
      *(["members' image AUROC", members] if members else []),
      "mem", c["memory_size"], "pipeline", s["timings"]["total_s"], "t", {k: c["timings"].get(k) for k in ("extract_train_s", "coreset_s", "evaluate_s")},
      "cache", s["cluster"].get("feature_cache"))
PY
}
run base
run cosine_top1 --set scoring.distance=cosine --set scoring.image_score=mean_top_percent
run augmented --set augment.copies=1 --set augment.rotation_degrees=5 --set augment.brightness=0.1
run cache_miss --set feature_cache.enabled=true --set feature_cache.dir=$OUT/cache
run cache_hit --set feature_cache.enabled=true --set feature_cache.dir=$OUT/cache --set coreset.ratio=0.05
run nocache_r005 --set coreset.ratio=0.05
CONFIG=configs/ensemble_lite.yaml run ensemble_lite0_lite1
