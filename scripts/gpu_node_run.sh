#!/usr/bin/env bash
# One run on an air-gapped GPU node, from the repository root: install orch offline beside the
# host's torch, `orch submit` the one-GPU KV study and the one-GPU training grid through an embedded
# Ray (loopback only), then pack the results (Parquet, manifests, mlflow.db) for copying back.
#   usage: scripts/gpu_node_run.sh WHEELHOUSE [RESULTS]
#     WHEELHOUSE  folder of wheels or .tar.xz from `make wheelhouse` (docs/gpu.md)
#     RESULTS     results folder (default: results-gpu)
# Environment (all optional):
#   OUT             where the log and the packed results go (default: gpu-run-out)
#   SITE            install folder put on PYTHONPATH (default: /tmp/orch-site)
#   PYTHON          the host's Python with torch (default: python3)
#   SERVING_GRID    (default grids/kv-study-1gpu.yaml)    SERVING_TIMEOUT  seconds (default 300)
#   TRAINING_GRID   (default grids/training-1gpu.yaml)    TRAINING_TIMEOUT seconds (default 180)
#   KILL_WORKERS    1: SIGKILL each training trial's worker once after its first checkpoint (default 1)
#   SUBMIT_ARGS     extra `orch submit` options (default: --no-dashboard)
# Each submit has a time limit: `orch submit` stops on SIGTERM and records unfinished trials, and
# the next step runs anyway, so results always get packed. Exit status: 0 when both grids finished
# with every trial done, 1 otherwise (the packed results say which trials failed and why).
set -euo pipefail

WHEELHOUSE="${1:?usage: scripts/gpu_node_run.sh WHEELHOUSE [RESULTS]}"
RESULTS="${2:-results-gpu}"
OUT="${OUT:-gpu-run-out}"
SITE="${SITE:-/tmp/orch-site}"
PYTHON="${PYTHON:-python3}"
SERVING_GRID="${SERVING_GRID:-grids/kv-study-1gpu.yaml}"
TRAINING_GRID="${TRAINING_GRID:-grids/training-1gpu.yaml}"
SERVING_TIMEOUT="${SERVING_TIMEOUT:-300}"
TRAINING_TIMEOUT="${TRAINING_TIMEOUT:-180}"
KILL_WORKERS="${KILL_WORKERS:-1}"
read -r -a SUBMIT_EXTRA <<< "${SUBMIT_ARGS:---no-dashboard}"
PACK_PART_BYTES=$((15 * 1024 * 1024))  # what comes back is limited per file

mkdir -p "$OUT"
LOG="$OUT/gpu_node_run.log"
LOG_TAG=gpu-run
source "$(dirname "${BASH_SOURCE[0]}")/node_env.sh"

log "host: $(uname -srm); $("$PYTHON" --version 2>&1); $(nproc) CPUs"
command -v nvidia-smi >/dev/null && nvidia-smi -L || log "no nvidia-smi"

install_site "$WHEELHOUSE" "$SITE"
"$PYTHON" - <<'EOF'
import mlflow, ray, torch, orchestrator  # noqa: F401
print("orch code:", orchestrator.__file__)
from importlib.metadata import version
print("versions:", {n: version(n) for n in ("orch", "ray", "mlflow-skinny", "torch", "transformers", "pyarrow")})
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
log "installed"

# Kill each training trial's Ray Train worker once, after its first checkpoint is registered.
kill_workers() {
  local experiment="$1" done_dir
  done_dir="$(mktemp -d)"
  while true; do
    for trial in "$RESULTS/$experiment"/work/*/; do
      [[ -d "$trial" ]] || continue
      local id snapshot pidfile
      id="$(basename "$trial")"; snapshot="$trial/ray_train/train/checkpoint_manager_snapshot.json"
      pidfile="$trial/pids/rank0.pid"
      [[ -e "$done_dir/$id" || ! -f "$pidfile" || ! -f "$snapshot" ]] && continue
      grep -Eq '"checkpoint_results": ?\[\{' "$snapshot" 2>/dev/null || continue
      if kill -9 "$(cat "$pidfile")" 2>/dev/null; then
        log "killed trial $id's worker (pid $(cat "$pidfile")) after its first checkpoint"
      fi
      touch "$done_dir/$id"
    done
    sleep 0.5
  done
}

experiment_of() { "$PYTHON" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["experiment"])' "$1"; }

status=0
submit() {  # grid, seconds
  local grid="$1" limit="$2" rc=0
  log "orch submit $grid (limit ${limit}s)"
  timeout -s TERM -k 30 "$limit" orch submit "$grid" --results "$RESULTS" "${SUBMIT_EXTRA[@]}" || rc=$?
  log "orch submit $grid: exit $rc"
  (( rc == 0 )) || status=1
}

submit "$SERVING_GRID" "$SERVING_TIMEOUT"

TRAINING_EXPERIMENT="$(experiment_of "$TRAINING_GRID")"
killer=""
if [[ "$KILL_WORKERS" == 1 ]]; then
  kill_workers "$TRAINING_EXPERIMENT" &
  killer=$!
fi
submit "$TRAINING_GRID" "$TRAINING_TIMEOUT"
[[ -n "$killer" ]] && kill "$killer" 2>/dev/null || true

for grid in "$SERVING_GRID" "$TRAINING_GRID"; do
  experiment="$(experiment_of "$grid")"
  log "orch report $experiment"
  orch report "$experiment" --results "$RESULTS" || status=1
done

# Pack everything but the trials' scratch folders (checkpoints, pid files): Parquet, manifests,
# mlflow.db and its artifacts. Split into parts when larger than what one returned file may be.
log "pack $RESULTS"
if [[ ! -d "$RESULTS" ]]; then
  log "no results folder: nothing to pack"; exit 1
fi
tar -C "$(dirname "$RESULTS")" --exclude='*/work' -cJf "$OUT/results.tar.xz" "$(basename "$RESULTS")"
if (( $(stat -c %s "$OUT/results.tar.xz") > PACK_PART_BYTES )); then
  split -b "$PACK_PART_BYTES" -d "$OUT/results.tar.xz" "$OUT/results.tar.xz.part"
  rm "$OUT/results.tar.xz"
  log "split into parts: cat $OUT/results.tar.xz.part* > results.tar.xz"
fi
ls -l "$OUT"
log "finished, status $status"
exit "$status"
