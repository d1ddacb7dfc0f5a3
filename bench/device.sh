#!/usr/bin/env bash
# The one entry point for measurements on a lent GPU machine (run from the repo root with .whl carried; results
# land in $OUT, which the device tool brings back). Device time is scarce: name several steps in one call.
#
#   bash bench/device.sh STEP [STEP ...]
#
# Steps (each prints what it measures; JSON results go to $OUT/<step>.json, logs to $OUT/<step>.log):
#   env            GPU, driver and library versions, one telemetry sample                       -> $OUT/env.txt
#   gpu-tests      every test marked `gpu` (FP4 kernels, fast experts, jobs, telemetry, ...) but attention-tests
#                  and gpu-memory-limit
#   gpu-memory-limit  tests/test_gpu_memory_limit_gpu.py: hardware.gpu_memory_limit_gib caps a job process (OOM past
#                  it while the card has room), the smoke run through the engine under 3 GiB, run refuses a limit
#                  above the card
#   attention-tests  tests/test_attention_gpu.py: flex vs eager (kernel, model, recompiles, 50-step SFT / QAT
#                  curves), what each test measured in $OUT/attention-gpu-*.json
#   qat-step       bench/qat_step.py: BF16 vs engine QAT vs modelopt, 2-layer gpt-oss-20b cut, 4 x 1024
#   qat-step-long  the same at 8 x 2048
#   qat-w4a4       NVFP4 W4A4: modelopt's kernels vs our backend through modelopt's expert wrapper
#   attn-step      bench/qat_step.py at 4 x 1024: BF16 and engine QAT, eager + full logits vs flex + chunked loss
#   context-sweep  bench/long_context.py sweep at T = 4k, 16k, 64k, then 1k in one process, 16k tokens per step
#                  (batch 4/1/1/16): bf16 and engine:mxfp4, each eager+full vs flex+chunked, checkpointing
#   context-1k context-4k context-16k context-64k   the same, one T per step
#   max-context    bench/long_context.py max-context: longest T for one LoRA QAT step of the 24-layer 20b shape
#   serve          bench/serve_bench.py: transformers serve of a 2-layer 20b-shaped checkpoint (load, TTFT, tokens/s)
#   serve-20b      the full 24-layer gpt-oss-20b-shaped MXFP4 checkpoint (bench/make_gpt_oss_checkpoint.py, made once
#                  per machine) served by transformers serve: load, TTFT, tokens/s, peak GPU memory (NVML), a chat turn
#   mem-probe      bench/mem_probe.py: live CUDA tensors after quantization, per path
#   fsdp           bench/fsdp_scaling.py on 1 and 2 GPUs, then the engine's FSDP2 pipeline (needs 2 GPUs)
#   engine-overhead  bench/engine_overhead.py: the demo recipe through the engine vs one bare process
#   demo-study     bench/demo_study.py: issue 13's grid, 12 workers on the GPU, 500 s budget (carry .study_cache
#                  holding tiny-gpt-oss-mxfp4-1423bc37bd1e (e4k2) and -3caa675d0347 (e16k2); STUDY_ARGS replaces the
#                  grid flags) -> $OUT/demo_study.jsonl, tables and summary at the end of $OUT/demo-study.log
#   demo-profile   bench/demo_gpu_profile.py: the demo's stages in one process (wall s, host syncs, peak memory),
#                  then again under torch.profiler (top ops, kernel launches) -> $OUT/demo-profile{,-ops}.json
#   gpt-oss-20b    tests/test_gpt_oss_20b_gpu.py: a 20b-shaped checkpoint, the 1-GPU recipe through the engine with a
#                  few steps; repeat the step while it says the run is still going (the engine goes on detached)
#                  GPT_OSS_20B_GPU_LIMIT_GIB=79 runs it with every job capped at that many GiB
#                  (hardware.gpu_memory_limit_gib: as on an H100 80GB)
#
# What each step found is recorded, with the card and the date, in docs/benchmarks.md.
set -u
STEPS="env gpu-tests gpu-memory-limit attention-tests qat-step qat-step-long qat-w4a4 attn-step context-sweep context-1k context-4k
  context-16k context-64k max-context serve serve-20b mem-probe fsdp engine-overhead demo-study demo-profile gpt-oss-20b"
[ $# -gt 0 ] || { sed -n '2,/^set -u/p' "$0" | grep '^#'; exit 2; }  # the header above, however long it grows
for s in "$@"; do
  case " $STEPS " in *" $s "*) ;; *) echo "unknown step '$s'; steps: $STEPS" >&2; exit 2 ;; esac
done
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"  # exported: the attention tests write their JSON there
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then  # once per machine: two device.sh may run side by side
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the lender's rule: no multicast

# step NAME SECONDS CMD...: run CMD under a time limit, its output teed to $OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]} ($(date +%T))"
}

run_step() {
  case "$1" in
    env) {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        python3 -c "import torch, triton, transformers, modelopt; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'modelopt', modelopt.__version__)"
        python3 -c "import json; from engine.runtime import telemetry; print(json.dumps(telemetry.sample(), default=str)[:3000])"
      } > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt" ;;
    gpu-tests) step gpu-tests 540 python3 -m pytest -q -rs -m gpu tests -p no:cacheprovider \
        --ignore=tests/test_attention_gpu.py --ignore=tests/test_gpu_memory_limit_gpu.py ;;  # their own steps
    gpu-memory-limit) step gpu-memory-limit 400 python3 -m pytest -q -s -rs -m gpu tests/test_gpu_memory_limit_gpu.py \
        -p no:cacheprovider ;;
    attention-tests) step attention-tests 210 python3 -m pytest -q -s -rs -m gpu tests/test_attention_gpu.py \
        -p no:cacheprovider ;;
    qat-step) step qat-step 300 python3 bench/qat_step.py --paths bf16,engine:mxfp4,engine:nvfp4,modelopt:nvfp4 \
        --json "$OUT/qat-step.json" ;;
    qat-step-long) step qat-step-long 200 python3 bench/qat_step.py --batch 8 --seq 2048 --steps 3 --warmup 1 \
        --paths bf16,engine:mxfp4,engine:nvfp4,modelopt:mxfp4 --json "$OUT/qat-step-long.json" ;;
    qat-w4a4) step qat-w4a4 300 python3 bench/qat_step.py --paths bf16,modelopt:nvfp4_w4a4,wrapper:nvfp4_w4a4 \
        --json "$OUT/qat-w4a4.json" ;;
    attn-step) step attn-step 85 python3 bench/qat_step.py --same-process \
        --paths bf16@eager/full,bf16@flex/chunked,engine:mxfp4@eager/full,engine:mxfp4@flex/chunked \
        --json "$OUT/attn-step.json" ;;
    context-sweep) step context-sweep 120 python3 bench/long_context.py sweep --seq 4096,16384,65536,1024 \
        --tokens 16384 --steps 1 --json "$OUT/context-sweep.json" ;;
    context-1k|context-4k|context-16k|context-64k) local t=${1#context-}; t=${t%k}
        step "$1" 280 python3 bench/long_context.py sweep --seq $((t * 1024)) --tokens 16384 --json "$OUT/$1.json" ;;
    max-context) step max-context 300 python3 bench/long_context.py max-context \
        --seqs 4096,8192,16384,32768,65536 --bisect 1 --json "$OUT/max-context.json" ;;
    serve) step serve 200 python3 bench/serve_bench.py --layers 2 --experts 32 --hidden 2880 --intermediate 2880 \
        --heads 64 --kv-heads 8 --head-dim 64 --vocab 201088 --requests 8 --max-tokens 128 --device cuda:0 \
        --start-timeout 100 --json "$OUT/serve.json" ;;
    serve-20b) local ckpt=${GPT_OSS_20B_CHECKPOINT:-workspace/gpt-oss-20b-random}
        [ -f "$ckpt/config.json" ] || step make-checkpoint 240 python3 bench/make_gpt_oss_checkpoint.py "$ckpt" --device cuda
        step serve-20b 330 python3 bench/serve_bench.py --model-dir "$ckpt" --requests 8 --max-tokens 128 --chat \
          --device cuda:0 --start-timeout 240 --workdir /tmp/serve-20b --json "$OUT/serve-20b.json" ;;
    mem-probe) for p in engine:nvfp4 engine:mxfp4; do step "mem-probe-${p/:/-}" 90 python3 bench/mem_probe.py --path "$p"; done ;;
    fsdp) step fsdp 330 python3 bench/fsdp_scaling.py --runs 2x1,2x2,6x1,6x2 --json "$OUT/fsdp.json"
        step fsdp-engine 330 python3 -m pytest -q -s -x -m gpu tests/test_distributed_gpu.py -p no:cacheprovider ;;
    engine-overhead) step engine-overhead 480 python3 bench/engine_overhead.py --recipe assets/recipes/demo.yaml \
        --json "$OUT/engine-overhead.json" ;;
    demo-study) step demo-study 570 python3 bench/demo_study.py --device cuda --cache "${STUDY_CACHE:-.study_cache}" \
        --cached-only --jobs "${STUDY_JOBS:-12}" --threads 1 --budget-s "${STUDY_BUDGET_S:-500}" \
        ${STUDY_ARGS:---shapes e16k2,e4k2 --bases mxfp4 --sft-lrs 3e-4,5e-4,2e-4 --sft-steps 900 --qat-lrs 2e-4,5e-5 \
        --formats mxfp4,nvfp4 --seeds 42} --json "$OUT/demo_study.jsonl" ;;
    demo-profile) export QAT_STUDIO_CACHE=/tmp/demo-profile-cache  # the base is built once, for both runs
        step demo-profile 300 python3 bench/demo_gpu_profile.py --json "$OUT/demo-profile.json"
        step demo-profile-ops 400 python3 bench/demo_gpu_profile.py --profile --json "$OUT/demo-profile-ops.json" ;;
    gpt-oss-20b) export GPT_OSS_20B_RUN=1
        step gpt-oss-20b 570 python3 -m pytest -q -s -rs -x -m gpu tests/test_gpt_oss_20b_gpu.py -p no:cacheprovider ;;
  esac
}

for s in "$@"; do run_step "$s" || exit $?; done
