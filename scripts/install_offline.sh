#!/usr/bin/env bash
# Install a wheelhouse (from `make wheelhouse`) with no package index, reusing the torch, CUDA and
# other packages the host already has: exactly the wheels in the set, none of their dependencies.
#   usage: scripts/install_offline.sh WHEELHOUSE [TARGET]
#     WHEELHOUSE  a folder of .whl files, or a .tar.xz of them (`make wheelhouse ARCHIVE=...`)
#     TARGET      a folder to install into (then put it on PYTHONPATH and TARGET/bin on PATH);
#                 without it, into the environment of $PYTHON (default python3), e.g. a venv made
#                 with --system-site-packages so that it sees the host's torch.
set -euo pipefail
WHEELHOUSE="${1:?usage: install_offline.sh WHEELHOUSE [TARGET]}"
TARGET="${2:-}"
PYTHON="${PYTHON:-python3}"

if [[ -f "$WHEELHOUSE" && "$WHEELHOUSE" == *.tar.xz ]]; then
  unpacked="$(mktemp -d)"
  trap 'rm -rf "$unpacked"' EXIT
  tar -xJf "$WHEELHOUSE" -C "$unpacked"
  WHEELHOUSE="$unpacked"
elif [[ ! -d "$WHEELHOUSE" ]]; then
  echo "error: wheelhouse '$WHEELHOUSE' is neither a folder of wheels nor a .tar.xz" >&2
  exit 2
fi
shopt -s nullglob
wheels=("$WHEELHOUSE"/*.whl)
if (( ${#wheels[@]} == 0 )); then
  echo "error: no .whl files in '$WHEELHOUSE'" >&2
  exit 2
fi

args=(install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --quiet)
if [[ -n "$TARGET" ]]; then
  args+=(--upgrade --target "$TARGET")
fi
# The set was built for one platform and Python; pip refuses a wheel that does not fit this one.
PIP_CONSTRAINT="" "$PYTHON" -m pip "${args[@]}" "${wheels[@]}"
echo "installed ${#wheels[@]} wheels${TARGET:+ into $TARGET}"
