"""How the code location presents itself: readable numbers, inline charts, leading error messages,
step priorities, the jobs' log level, the nightly schedule's default and the training progress line."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import PRIORITY_TAG

from sentinel_pipeline.definitions import ASSETS, CHECKS, defs
from sentinel_pipeline.orchestration import jobs
from sentinel_pipeline.orchestration.metadata import (
    INLINE_MD_LIMIT,
    md_table,
    readable,
    round_float,
    sparkline,
)
from sentinel_pipeline.orchestration.pipes_training import EpochProgress
from sentinel_pipeline.orchestration.presentation import present

# -- rounding ----------------------------------------------------------------------------------------


def long_floats(metadata: dict, where: str = "") -> list[str]:
    """Floats in a metadata mapping (plain, ``MetadataValue.float``, JSON, tables) with more than 4
    significant digits once the integer digits are discounted (``63.21`` fine, ``63.209291`` not)."""
    out: list[str] = []

    def visit(v: object, at: str) -> None:
        v = v.value if isinstance(v, dg.FloatMetadataValue) else v
        if isinstance(v, dg.JsonMetadataValue):
            v = v.data
        if isinstance(v, dg.TableMetadataValue):
            v = [dict(r.data) for r in v.records]
        if isinstance(v, bool | dg.MetadataValue):  # other metadata kinds hold no floats
            return
        if isinstance(v, float) and math.isfinite(v) and v != 0:
            if round_float(v) != v:
                out.append(f"{at}={v!r}")
        elif isinstance(v, dict):
            for k, x in v.items():
                visit(x, f"{at}.{k}")
        elif isinstance(v, list | tuple):
            for i, x in enumerate(v):
                visit(x, f"{at}[{i}]")

    for key, value in metadata.items():
        visit(value, f"{where}{key}")
    return out


def long_floats_of_run(result: dg.ExecuteInProcessResult) -> list[str]:
    """:func:`long_floats` over every materialisation and check evaluation of a run."""
    found: list[str] = []
    for e in result.get_asset_materialization_events():
        found += long_floats(dict(e.materialization.metadata), f"{e.materialization.asset_key.to_user_string()}:")
    for e in result.get_asset_check_evaluations():
        found += long_floats(dict(e.metadata), f"{e.asset_key.to_user_string()}:{e.check_name}:")
    return found


def test_floats_are_rounded_for_reading_integer_digits_kept() -> None:
    assert round_float(63.209291190000044) == 63.21
    assert round_float(0.000123456789) == 0.0001235
    assert round_float(123456.789) == 123457.0  # integer digits are never dropped
    assert round_float(-2.718281828) == -2.718
    assert math.isnan(round_float(float("nan"))) and round_float(float("inf")) == float("inf")
    assert round_float(0.0) == 0.0


def test_readable_rounds_every_kind_of_metadata_value() -> None:
    import numpy as np

    md = readable({
        "total_seconds": 63.209291190000044,
        "as_float": dg.MetadataValue.float(0.123456789),
        "as_json": dg.MetadataValue.json({"a": [1.23456789, {"b": 9.87654321}], "n": 3}),
        "numpy": np.float32(1.2345678),
        "count": 12,
        "flag": True,
        "text": "1.23456789 stays text",
        "table": dg.MetadataValue.table([dg.TableRecord({"x": 3.14159265, "name": "a"})],
                                         schema=dg.TableSchema(columns=[dg.TableColumn("x", "float"),
                                                                         dg.TableColumn("name", "string")])),
    })
    assert md is not None
    assert md["total_seconds"] == 63.21
    assert md["as_float"].value == 0.1235
    assert md["as_json"].data == {"a": [1.235, {"b": 9.877}], "n": 3}
    assert md["numpy"] == 1.235
    assert md["count"] == 12 and md["flag"] is True and md["text"] == "1.23456789 stays text"
    assert md["table"].records[0].data == {"x": 3.142, "name": "a"}


def test_markdown_tables_print_rounded_numbers() -> None:
    table = md_table([{"metric": "sharpe", "value": 8.912345678, "n": 1234567.0, "p": 0.000123456}]).value
    assert "| sharpe | 8.912 | 1234567 | 0.0001235 |" in table


# -- inline charts -----------------------------------------------------------------------------------


def test_sparkline_fits_the_uis_inline_limit_even_for_long_series() -> None:
    import numpy as np

    walk = np.cumsum(np.random.default_rng(0).normal(size=5000))
    for series in ({"train": [6.7, 6.6, 6.55], "val": [6.65, 6.6, 6.62]}, {"model": walk, "random": -walk}):
        md = sparkline(series, "chart").value
        assert len(md) < INLINE_MD_LIMIT  # rendered inline by Dagster 1.13, not behind "Show Markdown"
        assert md.startswith("![chart](data:image/png;base64,")


# -- errors lead with their cause ---------------------------------------------------------------------


def _failing_asset(exc: BaseException) -> dg.AssetsDefinition:
    @dg.asset(name="stage_under_test")
    def stage() -> None:
        raise exc

    return present(stage)


def _failure(asset: dg.AssetsDefinition) -> tuple[str, dict]:
    result = dg.Definitions(assets=[asset]).resolve_implicit_global_asset_job_def().execute_in_process(
        raise_on_error=False
    )
    (event,) = result.get_step_failure_events()
    data = event.step_failure_data
    return data.error.to_string(), (data.user_failure_data.metadata if data.user_failure_data else {})


def test_known_errors_fail_the_step_with_the_one_line_cause_first() -> None:
    text, metadata = _failure(_failing_asset(FileNotFoundError("data/raw/bars.parquet: no such file")))
    first = text.splitlines()[0]
    assert first.endswith("Failure: FileNotFoundError: data/raw/bars.parquet: no such file")
    assert "The above exception was caused by" not in text  # no second traceback after the cause
    assert metadata["error_type"].value == "builtins.FileNotFoundError"
    assert "Traceback (most recent call last)" in metadata["traceback"].value  # kept, out of the way
    from sentinel_pipeline.bundles import BundleError

    first = _failure(_failing_asset(BundleError("manifest.json: sha256 of model_best.pt differs")))[0].splitlines()[0]
    assert first.endswith("Failure: BundleError: manifest.json: sha256 of model_best.pt differs")


def test_programming_errors_keep_dagsters_full_report() -> None:
    text, metadata = _failure(_failing_asset(KeyError("oops")))
    assert not text.splitlines()[0].startswith("dagster._core.definitions.events.Failure")
    assert metadata == {}


def test_data_half_cli_prints_the_cause_not_a_traceback(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "bars.parquet").write_bytes(b"this is not a parquet file")
    proc = subprocess.run(
        [sys.executable, "-m", "sentinel_pipeline.data_half", "--data-dir", str(tmp_path / "data"),
         "--raw-dir", str(raw)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[0].startswith("sentinel-data: error: ")
    assert "bars.parquet" in proc.stderr.splitlines()[0]
    assert "Traceback" not in proc.stderr


# -- step priorities ---------------------------------------------------------------------------------


def test_checks_and_consumers_of_a_bundle_outrank_training_the_next_variant() -> None:
    def priority(defn: dg.AssetsDefinition) -> int:
        return int(defn.node_def.tags.get(PRIORITY_TAG, 0))

    by_asset = {k.to_user_string(): priority(a) for a in ASSETS for k in a.keys}
    by_check = {f"{k.asset_key.to_user_string()}:{k.name}": priority(c) for c in CHECKS for k in c.check_keys}
    assert by_check["bundle_mlp_two_head:bundle_verified"] > by_asset["replay_mlp_two_head"]
    assert by_asset["replay_mlp_two_head"] == by_asset["backtest_mlp_two_head"] > by_asset["bundle_seq_ctx_fusion"]
    assert by_check["replay_mlp_two_head:train_serve_parity"] > by_asset["bundle_seq_ctx_fusion"]


# -- jobs: log level, quick mode, nightly schedule -----------------------------------------------------


def test_every_job_logs_at_info_by_default() -> None:
    for name in ("full_pipeline", "ci_gate", "checks_only", "quick_pipeline"):
        config = defs.resolve_job_def(name).run_config
        assert config is not None and config["loggers"]["console"]["config"]["log_level"] == "INFO", name


def test_nightly_schedule_is_off_unless_the_deployment_turns_it_on() -> None:
    assert defs.resolve_schedule_def("nightly_rebuild").default_status == dg.DefaultScheduleStatus.STOPPED
    assert jobs.nightly_default_status({}) == dg.DefaultScheduleStatus.STOPPED
    assert jobs.nightly_default_status({"SENTINEL_NIGHTLY": "off"}) == dg.DefaultScheduleStatus.STOPPED
    for on in ("on", "ON", "1", "true"):
        assert jobs.nightly_default_status({"SENTINEL_NIGHTLY": on}) == dg.DefaultScheduleStatus.RUNNING


# -- training progress -------------------------------------------------------------------------------


def test_epoch_progress_line_has_position_elapsed_eta_and_early_stop_note() -> None:
    progress = EpochProgress(n_epochs=10, patience=3, started=0.0)
    line = progress.line({"epoch": 1, "epoch_seconds": 30.4, "improved": True, "throughput_samples_per_s": 2345.678,
                          "train_loss": 6.701234567, "val_loss": 6.65432101}, now=31.0)
    assert line.startswith("epoch 1/10 | elapsed 31s | ETA 4m34s (or 1m31s if it stops early after epoch 4: "
                           "patience 3, best epoch 1)")
    assert "2,346 samples/s" in line and "val_loss 6.654" in line and "(best so far)" in line
    line = progress.line({"epoch": 2, "epoch_seconds": 29.6, "improved": False}, now=61.0)
    assert line.startswith("epoch 2/10 | elapsed 1m01s | ETA 4m00s (or 1m00s if it stops early after epoch 4")
    last = EpochProgress(n_epochs=2, patience=3, started=0.0)
    last.line({"epoch": 1, "epoch_seconds": 5.0, "improved": True}, now=5.0)
    assert "last epoch" in last.line({"epoch": 2, "epoch_seconds": 5.0}, now=10.0)


@pytest.mark.parametrize("text,expected", [("1", [1]), ("1,2", [1, 2]), ("1, 2,4", [1, 2, 4])])
def test_bench_training_parses_thread_count_lists(text: str, expected: list[int]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import bench_training
    finally:
        sys.path.pop(0)
    assert bench_training.thread_counts(text) == expected
