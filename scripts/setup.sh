#!/usr/bin/env bash
# Create .venv and install revmix with its dev tools. Idempotent; safe to re-run.
#   TORCH_SPEC   torch requirement installed first (default: the 2.13.0 CPU wheel this kind of machine has;
#                on a GPU machine use e.g. TORCH_SPEC="torch==2.14.1")
#   EXTRAS       pip extras of revmix (default: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build onto a CPU machine.
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[${EXTRAS:-dev}]"
echo "revmix installed in $(pwd)/.venv"
