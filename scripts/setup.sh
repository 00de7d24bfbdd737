#!/usr/bin/env bash
# Create/refresh the project's virtualenv (.venv) on a fresh machine with Python 3.11.
# Installs the CPU build of torch 2.13.0 first where no torch is present, so that no multi-GB
# CUDA build is pulled in on CPU machines, then the project with its dev extras, then compiles the
# numba kernels once (scripts/warm_numba.py) so that the first run finds numba's cache warm.
#   TORCH_SPEC        torch requirement to install when none is present (default torch==2.13.0)
#   TORCH_INDEX_URL   optional index to take that torch build from
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0} (CPU build)"
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
stamp="$VENV/.sentinel-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing sentinel-pipeline and its dependencies"
  python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
# compile the numba kernels once on a tiny market, so that the first real run loads them from numba's
# cache (a cold cache cost 37 s and +2 GB peak RSS at 10M bars); again whenever a kernel's source changed
numba_stamp="$VENV/.sentinel-numba-warm"
numba_want="$(cat sentinel_pipeline/data/*.py sentinel_pipeline/replay/trades.py "$stamp" | sha256sum | cut -c1-16)"
if [ ! -f "$numba_stamp" ] || [ "$(cat "$numba_stamp")" != "$numba_want" ]; then
  python scripts/warm_numba.py
  echo "$numba_want" > "$numba_stamp"
fi
python - <<'PY'
import torch, dagster
print(f"[setup] ready: torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), dagster {dagster.__version__}")
PY
