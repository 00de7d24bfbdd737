#!/usr/bin/env bash
# The CI gate, end to end on the embedded synthetic default (a fresh, temporary pipeline instance):
#   1. `dagster job execute -j ci_gate`: the full graph with every asset check must pass (exit 0);
#   2. one byte of a trained bundle's weights is flipped and the gate runs again: it must exit
#      non-zero, the bundle's blocking `bundle_verified` check must fail, and that variant's replay
#      must not be executed.
# Needs the project's environment (scripts/setup.sh). GATE_WORKDIR keeps the instance for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
work="${GATE_WORKDIR:-$(mktemp -d)}"
export DAGSTER_HOME="$work/dagster_home" SENTINEL_DATA_DIR="$work/data" SENTINEL_MODELS_DIR="$work/models"
# the gate's own signing key and trusted keys (generated on first use), not the user's
export SENTINEL_SIGNING_KEY="$work/keys/signing_key.pem" SENTINEL_TRUSTED_KEYS="$work/keys/trusted_keys"
# the checks below read Dagster's per-event lines (STEP_START, ASSET_CHECK_EVALUATION): log at DEBUG
export SENTINEL_LOG_LEVEL=DEBUG
mkdir -p "$DAGSTER_HOME"
cp deploy/dagster.yaml "$DAGSTER_HOME/dagster.yaml"
variant=seq_ctx_fusion

echo "[ci-gate] 1/2 full graph + all checks on the synthetic default ($work)"
start=$(date +%s)
if ! dagster job execute -m sentinel_pipeline.definitions -j ci_gate >"$work/good.log" 2>&1; then
  grep -E "STEP_FAILURE|did not pass|RUN_FAILURE" "$work/good.log" | cut -c1-400 | tail -20
  echo "[ci-gate] FAIL: the gate failed on the untouched synthetic default"; exit 1
fi
echo "[ci-gate] good run passed in $(( $(date +%s) - start ))s: $(grep -c "ASSET_CHECK_EVALUATION.*passed" "$work/good.log") checks passed"
python -m sentinel_pipeline.summary

echo "[ci-gate] 2/2 tampered bundle: one byte flipped in ${variant}'s model_best.pt"
bundle=$(ls -d "$SENTINEL_MODELS_DIR/${variant}__"* | head -1)
python - "$bundle/model_best.pt" <<'PY'
import sys
path = sys.argv[1]
data = bytearray(open(path, "rb").read())
data[len(data) // 2] ^= 0xFF
open(path, "wb").write(bytes(data))
PY
if dagster job execute -m sentinel_pipeline.definitions -j ci_gate >"$work/tampered.log" 2>&1; then
  echo "[ci-gate] FAIL: the gate passed a tampered bundle"; exit 1
fi
grep -q "Asset check 'bundle_verified' on 'bundle_${variant}' did not pass" "$work/tampered.log" \
  || { echo "[ci-gate] FAIL: bundle_verified did not report the tampered bundle"; exit 1; }
if grep -q "replay_${variant} - STEP_START" "$work/tampered.log"; then
  echo "[ci-gate] FAIL: replay_${variant} executed on a tampered bundle"; exit 1
fi
grep "did not pass" "$work/tampered.log" | sed 's/.* - Asset check/  Asset check/' | cut -c1-200
echo "[ci-gate] OK: the good pipeline passes; the tampered bundle fails the gate (non-zero exit) and is not replayed"
