#!/usr/bin/env bash
# Third device session, nvidia-h100-x2: FSDP2 on two GPUs (issue 4), then the NVFP4 memory question (issue 6).
#   bash bench/device_run3.sh fsdp     # FSDP2 scaling benchmark + the engine's FSDP2 end-to-end GPU test
#   bash bench/device_run3.sh qat      # QAT step benchmark on GPU 0 (memory columns) + GPU numerics tests
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" "$@"; echo "=== $name exit $? ($(date +%T))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-fsdp}" in
  fsdp)
    step fsdp_scaling 330 python3 bench/fsdp_scaling.py --runs 2x1,2x2,6x1,6x2 --json "$OUT/fsdp_scaling.json" \
      2>&1 | tee "$OUT/fsdp_scaling.log"
    step fsdp2_engine_test 220 python3 -m pytest -q -s -x -m gpu tests/test_distributed_gpu.py -p no:cacheprovider \
      2>&1 | tee "$OUT/fsdp2_engine_test.log" ;;
  final)
    step fsdp2_engine_test 330 python3 -m pytest -q -s -x -m gpu tests/test_distributed_gpu.py -p no:cacheprovider \
      2>&1 | tee "$OUT/fsdp2_engine_test.log" | tail -60
    step qat_4x1024 170 python3 bench/qat_step.py --paths bf16,engine:mxfp4,engine:nvfp4,modelopt:nvfp4 \
      --json "$OUT/qat_step_run4.json" 2>&1 | tee "$OUT/qat_step_run4.log" ;;
  probe)
    step fsdp2_engine_test 200 python3 -m pytest -q -s -x -m gpu tests/test_distributed_gpu.py -p no:cacheprovider \
      2>&1 | tee "$OUT/fsdp2_engine_test.log" | tail -120
    for p in engine:nvfp4 engine:mxfp4; do step "mem_probe $p" 90 python3 bench/mem_probe.py --path $p 2>&1 | grep -v Warn; done
    step "mem_probe no-grad" 90 python3 bench/mem_probe.py --path engine:nvfp4 --no-grad-calibration 2>&1 | grep -v Warn ;;
  both)
    step fsdp2_engine_test 150 python3 -m pytest -q -s -x -m gpu tests/test_distributed_gpu.py -p no:cacheprovider \
      2>&1 | tee "$OUT/fsdp2_engine_test.log" | tail -150
    step qat_4x1024 200 python3 bench/qat_step.py --paths bf16,engine:mxfp4,engine:nvfp4,modelopt:nvfp4 \
      --json "$OUT/qat_step_mem.json" 2>&1 | tee "$OUT/qat_step_mem.log" ;;
  qat)
    step qat_4x1024 200 python3 bench/qat_step.py --paths bf16,engine:mxfp4,engine:nvfp4,modelopt:nvfp4 \
      --json "$OUT/qat_step_mem.json" 2>&1 | tee "$OUT/qat_step_mem.log"
    step gpu_tests 200 python3 -m pytest -q -s -m gpu tests/test_fp4_triton_gpu.py tests/test_fast_experts.py \
      -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" ;;
esac
