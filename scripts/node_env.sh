# Sourced by the GPU-node scripts (gpu_node_run.sh, multigpu_run.sh) after they set LOG and LOG_TAG:
# everything printed also goes to LOG, `log` stamps lines with the seconds since start, and the
# environment every run on a shared GPU host needs is exported.
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
log() { echo "[$LOG_TAG +$(( $(date +%s) - START ))s] $*"; }

# Ray: no usage stats, its own traffic on 127.0.0.1. NVLink multicast stays off for every process
# (shared hosts; the training trials set it in their workers too, with the interconnect's variables).
export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
