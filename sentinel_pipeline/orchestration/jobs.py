"""Jobs and the nightly schedule."""


import os

import dagster as dg

# the whole graph: every asset and every check (blocking checks stop what depends on them)
full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all(),
    description="Rebuild the whole graph: raw bars to replayed bundles. Stages whose inputs did not change are reused.",
    tags={"sentinel/pipeline": "full"},
)

# the CI gate: the same graph with all checks; a failing blocking check fails the run (non-zero exit)
ci_gate = dg.define_asset_job(
    "ci_gate",
    selection=dg.AssetSelection.all(),
    description="CI gate: materialise everything and run every asset check; fails when a blocking check fails.",
    tags={"sentinel/pipeline": "ci_gate"},
)

# re-run every check against what is materialised now, without rebuilding anything
checks_only = dg.define_asset_job(
    "checks_only",
    selection=dg.AssetSelection.all_asset_checks(),
    description="Run every asset check against the current artefacts (no materialisation).",
)

NIGHTLY_CRON = os.environ.get("SENTINEL_NIGHTLY_CRON", "0 2 * * *")

nightly_rebuild = dg.ScheduleDefinition(
    name="nightly_rebuild",
    job=full_pipeline,
    cron_schedule=NIGHTLY_CRON,
    execution_timezone="UTC",
    description="Nightly rebuild (02:00 UTC by default; SENTINEL_NIGHTLY_CRON overrides). Unchanged inputs are reused.",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
