#!/usr/bin/env bash
# Creates .parity-venv/ with anomalib 2.7 for benchmarks/parity_anomalib.py. anomalib is never a project
# dependency: the harness runs it in this separate interpreter and exchanges tensors through safetensors files.
# Only anomalib's base requirements are installed (no extras); torch and torchvision stay within the caps that
# the project's machines serve (torch<=2.14.1, torchvision<=0.29.1), so both sides run the same torch release.
# Usage: bash benchmarks/parity_venv.sh [VENV_DIR]   (default: .parity-venv in the repository root)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.parity-venv}"
python="${PARITY_PYTHON:-python3.11}"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet "anomalib==2.7.*" "torch<=2.14.1" "torchvision<=0.29.1" safetensors
"$venv/bin/python" -c "import anomalib, torch; print('anomalib', anomalib.__version__, 'torch', torch.__version__)"
