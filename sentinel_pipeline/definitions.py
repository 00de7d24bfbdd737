"""The Dagster code location: ``dagster dev -w workspace.yaml`` or ``-m sentinel_pipeline.definitions``.

Graph: raw_bars -> feature_contract/features -> labelled_dataset -> dataset_splits -> seq/snap scalers
-> hdf5_splits -> arrow_cache -> bundle_<variant> (blocking check ``bundle_verified``) ->
replay_<variant> (check ``train_serve_parity``), backtest_<variant> (test split) and model_final_<variant>
(the shippable archive ``model_final.zip``), for every variant of
the model registry; variant_comparison tabulates the backtests. The panel configuration (``panel_pipeline``,
daily bars of a universe) adds symbol_graph -> bundle_gat_multi_horizon (same blocking check) ->
backtest_gat_multi_horizon (a ranking evaluation); the intraday jobs leave those three out.

Every asset and check is passed through ``orchestration.presentation.present`` here, in one place:
metadata rounded for reading, known errors shown as their one-line cause, and step priorities that
verify, replay and backtest each bundle as soon as it exists (before the next variant trains).
"""

import dagster as dg

from sentinel_pipeline.orchestration.backtest_assets import BACKTEST_ASSETS
from sentinel_pipeline.orchestration.bundle_checks import BUNDLE_CHECKS, VerificationSettings
from sentinel_pipeline.orchestration.data_assets import DATA_ASSETS, DataHalfSettings
from sentinel_pipeline.orchestration.data_checks import DATA_CHECKS
from sentinel_pipeline.orchestration.graph_assets import GRAPH_ASSETS
from sentinel_pipeline.orchestration.jobs import (
    checks_only,
    ci_gate,
    full_pipeline,
    nightly_rebuild,
    panel_pipeline,
    quick_pipeline,
)
from sentinel_pipeline.orchestration.package_assets import PACKAGE_ASSETS
from sentinel_pipeline.orchestration.presentation import present
from sentinel_pipeline.orchestration.replay_assets import REPLAY_ASSETS, REPLAY_CHECKS
from sentinel_pipeline.orchestration.settings import PipelineSettings
from sentinel_pipeline.orchestration.shift_checks import SHIFT_CHECKS
from sentinel_pipeline.orchestration.training_assets import TRAINING_ASSETS

RESOURCES = {
    "settings": PipelineSettings(),
    "data_settings": DataHalfSettings(),
    "verification": VerificationSettings(),
    # training runs out of process through Dagster Pipes; swap this client to move it (README: Scale-out)
    "pipes_client": dg.PipesSubprocessClient(),
}

ASSETS = [present(a) for a in (*DATA_ASSETS, *GRAPH_ASSETS, *TRAINING_ASSETS, *REPLAY_ASSETS, *BACKTEST_ASSETS,
                                *PACKAGE_ASSETS)]

# evaluates the replay assets' automation condition (eager, and only when every blocking check of their
# dependencies passed): a newly verified bundle is replayed without anyone clicking; on by default
replay_automation = dg.AutomationConditionSensorDefinition(
    "replay_automation",
    target=dg.AssetSelection.assets(*REPLAY_ASSETS),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
# the same guarantee for the backtests (a newly verified bundle is backtested, a failed one never) and the
# variant comparison once its backtests are updated; on by default
backtest_automation = dg.AutomationConditionSensorDefinition(
    "backtest_automation",
    target=dg.AssetSelection.assets(*BACKTEST_ASSETS),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
# and for the archives: a newly verified bundle is packaged (model_final.zip), a failed one never; on by default
package_automation = dg.AutomationConditionSensorDefinition(
    "package_automation",
    target=dg.AssetSelection.assets(*PACKAGE_ASSETS),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
CHECKS = [present(c) for c in (*DATA_CHECKS, *SHIFT_CHECKS, *BUNDLE_CHECKS, *REPLAY_CHECKS)]
JOBS = [full_pipeline, ci_gate, checks_only, quick_pipeline, panel_pipeline]

# one process per run, not one per step: the multiprocess default spends ~6 s starting Python, Dagster
# and torch for each of the 24 steps (measured: an unchanged nightly rebuild took 2 min 44 s, its
# steps 0.05-7 s each). Steps would not overlap anyway (every writer is in the `sentinel_writes` pool
# of limit 1), and training runs in its own process through Pipes.
defs = dg.Definitions(
    executor=dg.in_process_executor,
    assets=ASSETS,
    asset_checks=CHECKS,
    jobs=JOBS,
    schedules=[nightly_rebuild],
    sensors=[replay_automation, backtest_automation, package_automation],
    resources=RESOURCES,
)
