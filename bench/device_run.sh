#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one go (device time is scarce: one machine start).
# Usage on the device: bash bench/device_run.sh   (with .whl carried; results land in $OUT)
set -u
source bench/device_env.sh
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers, modelopt; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'modelopt', modelopt.__version__)"
  python3 -c "import json; from engine import telemetry; print(json.dumps(telemetry.sample(), default=str)[:3000])"
} > "$OUT/env.txt" 2>&1
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" "$@"; echo "=== $name exit $? ($(date +%T))"; }
step qat_4x1024 240 python3 bench/qat_step.py --profile --json "$OUT/qat_4x1024.json"
step gpu_tests 150 python3 -m pytest -q -m gpu tests/test_fp4_triton_gpu.py -p no:cacheprovider
step qat_8x2048 110 python3 bench/qat_step.py --batch 8 --seq 2048 --steps 3 --warmup 1 \
  --paths bf16,engine:mxfp4,engine:nvfp4,modelopt:mxfp4 --json "$OUT/qat_8x2048.json"
step serve 130 python3 bench/serve_bench.py --layers 2 --experts 32 --hidden 2880 --intermediate 2880 --heads 64 \
  --kv-heads 8 --head-dim 64 --vocab 201088 --requests 8 --max-tokens 128 --device cuda:0 --start-timeout 100 \
  --json "$OUT/serve.json"
