#!/usr/bin/env bash
# Second device call: the fast experts path (engine/fast_experts.py) on the H100, tests + benchmark.
set -u
source bench/device_env.sh
step gpu_tests 200 python3 -m pytest -q -s -m gpu tests/test_fp4_triton_gpu.py -p no:cacheprovider
step qat_4x1024 150 python3 bench/qat_step.py --profile --json "$OUT/qat_4x1024_fast.json"
