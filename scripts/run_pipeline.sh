#!/usr/bin/env bash
# Set up (scripts/setup.sh) and materialise the whole asset graph on the embedded default data, with
# every asset check. Results: data/artifacts/ (data half), models/ (verified bundles + replay reports).
#
#   bash scripts/run_pipeline.sh            the main job (full_pipeline): three variants, ~20+ min on 2 cores
#   bash scripts/run_pipeline.sh --quick    the quick demo (quick_pipeline): a small SYNTHETIC market, the
#                                           MLP trained, verified by the default gates, replayed and
#                                           backtested in about a minute; its own directories data/quick/,
#                                           models/quick/ and Dagster instance .dagster_home/quick/, so it
#                                           never mixes with the main job's results
#   bash scripts/run_pipeline.sh --panel [--raw FILE]
#                                           the daily universe configuration (panel_pipeline): the panel
#                                           preset of the data half, the symbol graph, gat_multi_horizon
#                                           trained on day batches, verified, evaluated as a ranking; raw
#                                           input FILE (e.g. ../shared/data/daily_equities_panel.parquet),
#                                           else the SYNTHETIC panel; its own data/panel/, models/panel/ and
#                                           Dagster instance .dagster_home/panel/ (with --raw FILE:
#                                           data/panel-<file stem>/, models/panel-<file stem>/, ...)
# Other arguments pass through to `dagster job execute` (e.g. -c run_config.yaml).
#   DAGSTER_HOME   Dagster instance directory (default .dagster_home/, created with deploy/dagster.yaml)
#   SENTINEL_LOG_LEVEL  console log level of the run (default INFO; DEBUG shows every engine event)
set -euo pipefail
cd "$(dirname "$0")/.."
job=full_pipeline
args=()
raw=""
want_raw=0
for a in "$@"; do
  if [ "$want_raw" = 1 ]; then raw="$a"; want_raw=0
  elif [ "$a" = "--quick" ]; then job=quick_pipeline
  elif [ "$a" = "--panel" ]; then job=panel_pipeline
  elif [ "$a" = "--raw" ]; then want_raw=1
  else args+=("$a"); fi
done
if [ -n "$raw" ] && [ "$job" != panel_pipeline ]; then
  echo "--raw is an option of --panel (the main job reads SENTINEL_RAW_DIR or data/raw/)" >&2; exit 2
fi
start=$(date +%s)
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
if [ "$job" = quick_pipeline ]; then
  export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}/quick"
  export SENTINEL_QUICK_DATA_DIR="${SENTINEL_QUICK_DATA_DIR:-data/quick}"
  export SENTINEL_QUICK_MODELS_DIR="${SENTINEL_QUICK_MODELS_DIR:-models/quick}"
  # the summary below reads the quick run's directories; the demo never reads a user's raw folder
  export SENTINEL_DATA_DIR="$SENTINEL_QUICK_DATA_DIR" SENTINEL_MODELS_DIR="$SENTINEL_QUICK_MODELS_DIR"
  unset SENTINEL_RAW_DIR
  echo "[quick] synthetic demo: a small generated market with a strong planted signal (not real data);"
  echo "[quick] results in $SENTINEL_DATA_DIR/ and $SENTINEL_MODELS_DIR/, Dagster instance $DAGSTER_HOME"
elif [ "$job" = panel_pipeline ]; then
  # one set of directories (and Dagster instance) per raw input: bundles of the synthetic panel and of a
  # real file never meet in one models folder (same contract, different data)
  tag=panel
  if [ -n "$raw" ]; then tag="panel-$(basename "$raw" | sed -e 's/\.[^.]*$//' -e 's/[^A-Za-z0-9_-]/_/g')"; fi
  export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}/$tag"
  export SENTINEL_PANEL_DATA_DIR="${SENTINEL_PANEL_DATA_DIR:-data/$tag}"
  export SENTINEL_PANEL_MODELS_DIR="${SENTINEL_PANEL_MODELS_DIR:-models/$tag}"
  export SENTINEL_DATA_DIR="$SENTINEL_PANEL_DATA_DIR" SENTINEL_MODELS_DIR="$SENTINEL_PANEL_MODELS_DIR"
  unset SENTINEL_RAW_DIR
  if [ -n "$raw" ]; then
    [ -e "$raw" ] || { echo "--raw $raw: no such file or folder" >&2; exit 2; }
    export SENTINEL_PANEL_RAW="$(cd "$(dirname "$raw")" && pwd)/$(basename "$raw")"
    echo "[panel] daily universe configuration on $SENTINEL_PANEL_RAW"
  else
    unset SENTINEL_PANEL_RAW
    echo "[panel] daily universe configuration on the SYNTHETIC panel (planted cross-sectional signal; not real data)"
  fi
  echo "[panel] results in $SENTINEL_DATA_DIR/ and $SENTINEL_MODELS_DIR/, Dagster instance $DAGSTER_HOME"
else
  export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
fi
# Dagster's own preview/supersession warnings say nothing about the run; PYTHONWARNINGS=default shows them
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || cp deploy/dagster.yaml "$DAGSTER_HOME/dagster.yaml"
status=0
run_start=$(date +%s)
dagster job execute -m sentinel_pipeline.definitions -j "$job" ${args[@]+"${args[@]}"} || status=$?
echo "[run] $job: exit $status; the Dagster run took $(( $(date +%s) - run_start ))s, the whole command $(( $(date +%s) - start ))s"
if [ "$job" = quick_pipeline ]; then
  echo "[quick] SYNTHETIC DEMO: the bundle below was trained and verified on a generated market with a strong"
  echo "[quick] planted signal; it says the pipeline works end to end, nothing about any real market."
fi
python -m sentinel_pipeline.summary || true
exit $status
