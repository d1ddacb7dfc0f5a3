#!/usr/bin/env bash
# Fourth device session, one GPU: telemetry and cancel on a real GPU (issues 5 and 7), every GPU test on the final
# code, and NVFP4 W4A4's QAT step (issue 6 measured the weight-only formats only). Only tests/test_gpu_jobs.py has run
# (by hand, 2026-11-28) before the session's device time ran out; the rest is for the next session.
#   bash bench/device_run4.sh tests | w4a4
set -u
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-tests}" in
  tests)
    step gpu_jobs 240 python3 -m pytest -q -s -m gpu tests/test_gpu_jobs.py -p no:cacheprovider 2>&1 \
      | tee "$OUT/gpu_jobs.log"
    step gpu_numerics 300 python3 -m pytest -q -m gpu tests/test_fp4_gpu.py tests/test_fp4_triton_gpu.py \
      tests/test_fast_experts.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_numerics.log" | tail -15 ;;
  w4a4)  # the W4A4 QAT step: modelopt's kernels vs our backend, both through modelopt's expert wrapper
    step qat_w4a4 300 python3 bench/qat_step.py --paths bf16,modelopt:nvfp4_w4a4,wrapper:nvfp4_w4a4 \
      --json "$OUT/qat_step_w4a4.json" 2>&1 | tee "$OUT/qat_step_w4a4.log" ;;
esac
