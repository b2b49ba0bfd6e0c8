# Sourced by the GPU-node scripts (gpu_node_run.sh, multigpu_run.sh) after they set LOG and LOG_TAG:
# everything printed also goes to LOG, `log` stamps lines with the seconds since start, the
# environment every run on a shared GPU host needs is exported, and `install_site` installs orch.
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
log() { echo "[$LOG_TAG +$(( $(date +%s) - START ))s] $*"; }

# Ray: no usage stats, its own traffic on 127.0.0.1. NVLink multicast stays off for every process
# (shared hosts; the training trials set it in their workers too, with the interconnect's variables).
export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# install_site WHEELHOUSE SITE: install the wheelhouse into SITE with no index and no dependencies
# (the host's torch stays), skipped when SITE already holds this very wheelhouse's install (a second
# script on the same warm machine); then the checkout's code first on PYTHONPATH (it is what the
# run measures, even where the wheelhouse's orch wheel is older; its dist-info still supplies the
# entry points), SITE after it. Ray's workers inherit the path.
install_site() {
  local wheelhouse="$1" site="$2" stamp="$2/.orch-wheelhouse"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$(ls -l --time-style=+%s "$wheelhouse")" ]]; then
    log "orch already installed in $site from $wheelhouse"
  else
    log "install $wheelhouse into $site (no index, no dependencies: the host's torch stays)"
    rm -rf "$site"
    PYTHON="$PYTHON" bash scripts/install_offline.sh "$wheelhouse" "$site"
    ls -l --time-style=+%s "$wheelhouse" > "$stamp"
  fi
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$site/bin:$PATH"
}
