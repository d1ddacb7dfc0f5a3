# Sourced by bench/device_run*.sh on a lent GPU machine (run from the repo root, with .whl carried): installs the
# carried wheels, sets the environment every run needs, and defines `step NAME SECONDS CMD...`.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the lender's rule: no multicast
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" "$@"; echo "=== $name exit $? ($(date +%T))"; }
