#!/usr/bin/env bash
# The multi-GPU runs on ONE host with 2 or 4 GPUs (issue 14), from the repository root:
#   training  `orch submit` of grids/a2sgd-multigpu.yaml with num_workers = the GPUs used: one Ray
#             Train worker per GPU over NCCL, every compressor, interconnect nvlink and sockets;
#   scaling   benchmarks/bench_grid_scaling.py: one serving grid (grids/kv-study-1gpu.yaml, 24 trials)
#             on 1, 2 (and 4) GPUs of the host: trials per hour and the ratio to linear.
# Installs orch offline from the wheelhouse beside the host's torch first (scripts/install_offline.sh;
# skipped when SITE already holds this wheelhouse's install), and leaves under $OUT: the results
# (Parquet, manifests, mlflow.db; no work/) packed as results.tar.xz, summary.md (hardware, NVLink
# topology, the training tables, which transports NCCL used, the scaling table) and the log.
#   usage: scripts/multigpu_run.sh WHEELHOUSE [RESULTS]
#     WHEELHOUSE  folder of wheels or .tar.xz from `make wheelhouse` (docs/gpu.md)
#     RESULTS     results folder (default: results-multigpu)
# Environment (all optional):
#   OUT              where the packed results, summary.md and the log go (default: multigpu-run-out)
#   SITE, PYTHON     install folder (default /tmp/orch-site) and the host's Python with torch (python3)
#   STEPS            the steps to run, in order (default "training scaling"). Where one command may run
#                    at most 10 minutes: STEPS=training, then STEPS=scaling, on the same (warm) machine.
#                    `orch submit` resumes: a training step cut short by its limit records the unfinished
#                    trials, and the same command again runs only those (same RESULTS folder).
#   GPUS             how many GPUs to use (default: every GPU torch sees; at least 2)
#   CHECK_ONE_GPU    1: allow GPUS=1, a reduced CHECK of the GPU-only code paths on a one-GPU machine
#                    (one-worker NCCL training, scaling on 1 GPU), not the benchmark; its defaults are
#                    TRAINING_GRID=grids/a2sgd-multigpu-check.yaml, SCALING_GRID=grids/kv-scaling-check-gpu.yaml
#   TRAINING_GRID    (default grids/a2sgd-multigpu.yaml)   TRAINING_TIMEOUT seconds (default 500)
#   SCALING_GRID     (default grids/kv-study-1gpu.yaml)    SCALING_TIMEOUT  seconds (default 420)
#   COMMIT           the commit the summary names (default: git rev-parse; set it for a staged copy)
#   SCALING_SLOTS    GPU counts, the first the baseline (default 1,2 with 2 or 3 GPUs; 1,2,4 with 4+)
# Exit status: 0 when every step finished with every trial done, 1 otherwise (the summary says which).
set -euo pipefail

WHEELHOUSE="${1:?usage: scripts/multigpu_run.sh WHEELHOUSE [RESULTS]}"
RESULTS="${2:-results-multigpu}"
OUT="${OUT:-multigpu-run-out}"
SITE="${SITE:-/tmp/orch-site}"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-training scaling}"
CHECK_ONE_GPU="${CHECK_ONE_GPU:-0}"
if [[ "$CHECK_ONE_GPU" == 1 ]]; then
  MIN_GPUS=1
  TRAINING_GRID="${TRAINING_GRID:-grids/a2sgd-multigpu-check.yaml}"
  SCALING_GRID="${SCALING_GRID:-grids/kv-scaling-check-gpu.yaml}"
elif [[ "$CHECK_ONE_GPU" == 0 ]]; then
  MIN_GPUS=2
else
  echo "error: CHECK_ONE_GPU='$CHECK_ONE_GPU' (allowed: 0 or 1)" >&2; exit 2
fi
TRAINING_GRID="${TRAINING_GRID:-grids/a2sgd-multigpu.yaml}"
SCALING_GRID="${SCALING_GRID:-grids/kv-study-1gpu.yaml}"
TRAINING_TIMEOUT="${TRAINING_TIMEOUT:-500}"
SCALING_TIMEOUT="${SCALING_TIMEOUT:-420}"
# A staged copy without its own .git would report the enclosing checkout's commit: say COMMIT=... then.
COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
PACK_PART_BYTES=$((15 * 1024 * 1024))  # what comes back is limited per file

for step in $STEPS; do
  [[ "$step" == training || "$step" == scaling ]] || { echo "error: STEPS: unknown step '$step' (allowed: training scaling)" >&2; exit 2; }
done
mkdir -p "$OUT"
LOG="$OUT/multigpu_run.log"
SUMMARY="$OUT/summary.md"
LOG_TAG=multigpu
source "$(dirname "${BASH_SOURCE[0]}")/node_env.sh"

install_site "$WHEELHOUSE" "$SITE"

VISIBLE="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
GPUS="${GPUS:-$VISIBLE}"
if (( GPUS < MIN_GPUS || GPUS > VISIBLE )); then
  log "error: GPUS=$GPUS, but this needs $MIN_GPUS or more of the $VISIBLE GPUs torch sees (CHECK_ONE_GPU=1 allows 1)"; exit 2
fi
# Only the GPUs used are visible to Ray (then a 2-GPU run on a 4-GPU host never runs two trials at once).
if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((GPUS - 1)))"
else
  CUDA_VISIBLE_DEVICES="$(echo "$CUDA_VISIBLE_DEVICES" | cut -d, -f1-"$GPUS")"
fi
export CUDA_VISIBLE_DEVICES
if [[ -z "${SCALING_SLOTS:-}" ]]; then
  SCALING_SLOTS=$( ((GPUS >= 4)) && echo 1,2,4 || { ((GPUS >= 2)) && echo 1,2 || echo 1; })
fi

{
  echo "# Multi-GPU run, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  [[ "$CHECK_ONE_GPU" == 1 ]] && echo "**One-GPU reduced check (CHECK_ONE_GPU=1): GPU code paths, not the benchmark.**" && echo
  echo "Steps: $STEPS; GPUs used: $GPUS of $VISIBLE; commit $COMMIT"
  echo
  echo '```'
  "$PYTHON" - <<'EOF' || true
import os, platform, torch
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except Exception:  # a torch built without NCCL
    nccl = "-"
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "nccl", nccl,
      "cpus", os.cpu_count())
EOF
  nvidia-smi -L 2>/dev/null || true
  nvidia-smi topo -m 2>/dev/null || echo "(no nvidia-smi topo)"
  echo '```'
} > "$SUMMARY.head"
cat "$SUMMARY.head" >> "$SUMMARY" && rm "$SUMMARY.head"

status=0
training() {
  local grid experiment rc=0
  experiment="$("$PYTHON" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["experiment"])' "$TRAINING_GRID")"
  grid="$OUT/$(basename "$TRAINING_GRID" .yaml)-${GPUS}gpu.yaml"
  # The same grid with one worker per GPU used.
  "$PYTHON" - "$TRAINING_GRID" "$grid" "$GPUS" <<'EOF'
import sys, yaml
data = yaml.safe_load(open(sys.argv[1]))
data["base"]["num_workers"] = int(sys.argv[3])
yaml.safe_dump(data, open(sys.argv[2], "w"), sort_keys=False)
EOF
  log "orch submit $grid ($GPUS workers per trial, limit ${TRAINING_TIMEOUT}s)"
  timeout -s TERM -k 30 "$TRAINING_TIMEOUT" orch submit "$grid" --results "$RESULTS" --no-dashboard || rc=$?
  log "orch submit: exit $rc"
  (( rc == 0 )) || status=1
  orch report "$experiment" --results "$RESULTS" || status=1
  {
    echo; echo "## Training: \`orch submit $(basename "$grid")\` (exit $rc)"; echo
    "$PYTHON" -m benchmarks.a2sgd_table --results "$RESULTS" --experiment "$experiment" || echo "(no tables)"
    echo; echo "What NCCL was told and which transports its channels used (rank 0 / NCCL's log):"; echo
    "$PYTHON" - "$RESULTS" "$experiment" <<'EOF'
import sys
from pathlib import Path
from orchestrator.report.data import load_experiment
from orchestrator.store import ExperimentStore
summary = load_experiment(ExperimentStore(Path(sys.argv[1]), sys.argv[2])).table("train_summary")
print("| interconnect | compressor | workers | nccl_paths | nccl_env | restarts |\n|---|---|---|---|---|---|")
for row in summary.sort_values(["interconnect", "compressor"]).itertuples():
    # None: no NCCL log (no communicator formed); "": NCCL ran but connected no channel (one rank)
    paths = (row.nccl_paths or "none (no channel)") if isinstance(row.nccl_paths, str) else "-"
    print(f"| {row.interconnect} | {row.compressor} | {row.num_workers} | {paths} | {row.nccl_env} | {row.restarts} |")
EOF
  } >> "$SUMMARY" || status=1
}

scaling() {
  local rc=0
  log "bench_grid_scaling: $SCALING_GRID on $SCALING_SLOTS GPUs (limit ${SCALING_TIMEOUT}s)"
  timeout -s TERM -k 30 "$SCALING_TIMEOUT" "$PYTHON" -m benchmarks.bench_grid_scaling --device cuda \
    --slots "$SCALING_SLOTS" --grid "$SCALING_GRID" --results "$RESULTS" --json "$OUT/scaling.json" \
    | tee "$OUT/scaling.txt" || rc=$?
  log "bench_grid_scaling: exit $rc"
  (( rc == 0 )) && ! grep -q "did not finish" "$OUT/scaling.txt" || status=1
  { echo; echo "## Grid scaling: \`python -m benchmarks.bench_grid_scaling --device cuda --slots $SCALING_SLOTS\` (exit $rc)"
    echo; cat "$OUT/scaling.txt"; } >> "$SUMMARY"
}

for step in $STEPS; do
  "$step"
done

log "pack $RESULTS"
if [[ -d "$RESULTS" ]]; then
  tar -C "$(dirname "$RESULTS")" --exclude='*/work' -cJf "$OUT/results.tar.xz" "$(basename "$RESULTS")"
  if (( $(stat -c %s "$OUT/results.tar.xz") > PACK_PART_BYTES )); then
    split -b "$PACK_PART_BYTES" -d "$OUT/results.tar.xz" "$OUT/results.tar.xz.part"
    rm "$OUT/results.tar.xz"
    log "split into parts: cat $OUT/results.tar.xz.part* > results.tar.xz"
  fi
else
  log "no results folder: nothing to pack"; status=1
fi
ls -l "$OUT"
log "finished, status $status"
exit "$status"
