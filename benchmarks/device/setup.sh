# Source me on a lent GPU machine: the safety environment, the carried wheels, an output folder.
# Multicast must never be created or used on the shared machines (DEVICE.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export WEAVELM_DISABLE_MULTICAST=1 NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
export OUT=${OUT:-/tmp/weavelm-out}
mkdir -p "$OUT"
if [ -d .wheels ]; then
  pip install --no-index --no-deps --quiet .wheels/*.whl >/tmp/weavelm-pip.txt 2>&1 || cat /tmp/weavelm-pip.txt
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
