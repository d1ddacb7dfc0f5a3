#!/usr/bin/env bash
# Second device call: the fast experts path (engine/fast_experts.py) on the H100, tests + benchmark.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" "$@"; echo "=== $name exit $? ($(date +%T))"; }
step gpu_tests 200 python3 -m pytest -q -s -m gpu tests/test_fp4_triton_gpu.py -p no:cacheprovider
step qat_4x1024 150 python3 bench/qat_step.py --profile --json "$OUT/qat_4x1024_fast.json"
