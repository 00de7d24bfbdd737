#!/usr/bin/env bash
# Set up (scripts/setup.sh) and materialise the whole asset graph on the embedded default data
# (a synthetic market is generated into data/raw/ when it holds no parquet), with every asset check.
# Results: data/artifacts/ (data half), models/ (verified bundles + replay reports).
#   DAGSTER_HOME   Dagster instance directory (default .dagster_home/, created with deploy/dagster.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || cp deploy/dagster.yaml "$DAGSTER_HOME/dagster.yaml"
status=0
dagster job execute -m sentinel_pipeline.definitions -j full_pipeline "$@" || status=$?
python -m sentinel_pipeline.summary || true
exit $status
