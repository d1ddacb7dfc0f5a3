#!/usr/bin/env bash
# Third device session, nvidia-h100-x2: FSDP2 on two GPUs (issue 4), then the NVFP4 memory question (issue 6).
#   bash bench/device_run3.sh fsdp | qat | probe      (what each does: below)
set -u
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-fsdp}" in
  fsdp)  # issue 4: FSDP2 scaling on 1 and 2 GPUs, then the engine's FSDP2 pipeline vs one GPU
    step fsdp_scaling 330 python3 bench/fsdp_scaling.py --runs 2x1,2x2,6x1,6x2 --json "$OUT/fsdp_scaling.json" \
      2>&1 | tee "$OUT/fsdp_scaling.log"
    step fsdp2_engine_test 330 python3 -m pytest -q -s -x -m gpu tests/test_distributed_gpu.py -p no:cacheprovider \
      2>&1 | tee "$OUT/fsdp2_engine_test.log" | tail -60 ;;
  qat)  # issue 6: the QAT step benchmark (one process per path), then the GPU numerics tests
    step qat_4x1024 200 python3 bench/qat_step.py --paths bf16,engine:mxfp4,engine:nvfp4,modelopt:nvfp4 \
      --json "$OUT/qat_step.json" 2>&1 | tee "$OUT/qat_step.log"
    step gpu_tests 200 python3 -m pytest -q -s -m gpu tests/test_fp4_triton_gpu.py tests/test_fast_experts.py \
      -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" ;;
  probe)  # live CUDA tensors after quantization (how the 5.2 GiB of issue 6's same-process runs was found)
    for p in engine:nvfp4 engine:mxfp4; do step "mem_probe $p" 90 python3 bench/mem_probe.py --path "$p"; done ;;
esac
