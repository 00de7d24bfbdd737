"""``python -m sentinel_pipeline.summary``: where a pipeline instance's results are, and their state.

Reads only files (no Dagster): the data-half artefacts, every bundle with its latest verification
verdict, the replay report in each bundle's ``records/``, and the test-period backtest of each variant.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sentinel_pipeline.bundles import list_bundles, records_dir
from sentinel_pipeline.paths import SPLITS, ArtifactPaths
from sentinel_pipeline.stage_cache import failed_dir, last_failure, read_record


def _verdict(bundle: Path) -> str:
    path = records_dir(bundle) / "verification.json"
    if not path.exists():
        return "not verified"
    record = json.loads(path.read_text())
    latest = record.get("latest", record)
    passed = latest.get("passed")
    if passed:
        from sentinel_pipeline.bundles import BundleError
        from sentinel_pipeline.verification import require_verified

        try:  # a record says PASS only as far as its signature and the bundle's own still hold
            require_verified(bundle)
        except BundleError as exc:
            return f"verification record REFUSED: {str(exc).splitlines()[0][:300]}"
        return "verified: PASS"
    failed = [c["name"] for c in latest.get("checks", []) if not c.get("passed")]
    return f"verified: FAIL ({', '.join(failed)})"


def _num(value: object) -> str:
    """A number for reading (3 significant digits); anything else as it is."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _data_source_lines(paths: ArtifactPaths) -> list[str]:
    """Where the bars came from, from the raw stage's record: says SYNTHETIC plainly when it was."""
    record = read_record(paths.raw_bars_dir)
    meta = (record or {}).get("metadata", {})
    source = meta.get("data_source")
    if source is None:
        return []
    lines = [f"  data source  {source}"]
    if meta.get("synthetic"):
        what = "synthetic panel" if str(source).startswith("synthetic panel") else "synthetic default market"
        where = ("give the panel preset a parquet/CSV file or folder (--raw) to use your own" if what == "synthetic panel"
                 else f"put your parquet/CSV bars into {paths.raw_dir} to use your own")
        lines.append(f"  SYNTHETIC    every artefact and bundle below was built from the {what}, not real data; {where}")
    return lines


def summarise(paths: ArtifactPaths) -> list[str]:
    lines = [f"data half ({paths.artifacts}):", *_data_source_lines(paths)]
    for name, stage_dir in (("raw bars", paths.raw_bars_dir), ("features", paths.features_dir),
                            ("labels", paths.labels.parent), ("splits", paths.split_assignment.parent),
                            ("scalers", paths.scalers_dir), ("hdf5", paths.hdf5_dir), ("arrow cache", paths.arrow_dir)):
        record = read_record(stage_dir)
        state = f"built {record['finished_at']}" if record else "missing"
        failure = last_failure(stage_dir)
        if failure is not None:
            state += f"; LAST RUN FAILED {failure.get('failed_at')}: see {failed_dir(stage_dir)}"
        lines.append(f"  {name:<12} {stage_dir}  [{state}]")
    if paths.quality_report.exists():
        q = json.loads(paths.quality_report.read_text())
        lines.append(f"  quarantine   {q.get('n_quarantined')} of {q.get('n_rows_in')} rows -> {paths.quarantine}")
        bq = q.get("bar_quality")
        if bq:
            lines.append(
                f"  bar quirks   {bq['jumps']['n']} jumps, {bq['spikes']['n']} spikes, "
                f"{bq['zero_volume_runs']['n_runs']} zero-volume runs, {bq['flat_runs']['n_runs']} flat runs, "
                f"{bq['holes']['n']} holes (flagged, not dropped) -> {paths.bar_flags}"
            )
    lines.append(f"  splits       {', '.join(str(paths.h5(s)) for s in SPLITS)}")
    bundles = list_bundles(paths.models_dir) if paths.models_dir.exists() else []
    lines.append(f"bundles ({paths.models_dir}): {len(bundles)}")
    for b in bundles:
        replay = records_dir(b) / "replay_report.json"
        extra = ""
        if replay.exists():
            m = json.loads(replay.read_text())["current"]["metrics"]
            extra = (f"; replay: {m.get('n_trades_created')} trades, hit rate {_num(m.get('hit_rate'))}, "
                     f"sharpe {_num(m.get('sharpe'))}")
        lines.append(f"  {b.name}  [{_verdict(b)}{extra}]")
    lines += _backtests(paths.artifacts / "backtest")
    return lines


def _backtests(root: Path) -> list[str]:
    reports = sorted(root.glob("*/backtest_report.json")) if root.is_dir() else []
    lines = [f"backtests ({root}): {len(reports)}"]
    for path in reports:
        r = json.loads(path.read_text())
        m = r["metrics"]
        sharpe = f"{m['sharpe']:.2f}" if m.get("sharpe") is not None else "not reported"
        p = [((r.get(k) or {}).get("total_return") or {}).get("p_value") for k in ("random_baseline", "shifted_baseline")]
        vs_random = (f", p of the net return vs random trades {p[0]:.3f}, vs its schedule moved in time {p[1]:.3f}"
                     if None not in p else "")
        lines.append(f"  {path.parent.name}: {r.get('bundle')}  [{m['n_trades']} trades over {m['n_days']} days, "
                     f"net return {m['total_return']:+.2%}, Sharpe {sharpe}{vs_random}]")
    rankings = sorted(root.glob("*/ranking_report.json")) if root.is_dir() else []
    if rankings:
        lines.append(f"ranking evaluations ({root}): {len(rankings)}")
    for path in rankings:
        r = json.loads(path.read_text())
        h5 = (((r.get("splits") or {}).get("test") or {}).get("horizons") or {}).get("5") or {}
        ric = h5.get("rank_ic") or {}
        m = (r.get("backtest") or {}).get("metrics") or {}
        perm = (((r.get("backtest") or {}).get("permuted_rankings") or {}).get("sharpe_daily_gross") or {}).get("p_value")
        lines.append(f"  {path.parent.name}: {r.get('bundle')}  [test 5-day RankIC {_num(ric.get('mean'))} "
                     f"(HAC t {_num(ric.get('hac_t'))}); daily long-short net return {_num(m.get('total_return'))}, "
                     f"Sharpe {_num(m.get('sharpe'))} [{_num(m.get('sharpe_lower'))}, {_num(m.get('sharpe_upper'))}]"
                     + (f", p vs permuted rankings {_num(perm)}" if perm is not None else "") + "]")
        lines.append(f"    tables: {path.parent / 'ranking.md'}")
    table = root / "variant_comparison.md"
    if table.exists():
        lines.append(f"  side by side: {table}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("SENTINEL_DATA_DIR", "data"))
    ap.add_argument("--models-dir", default=os.environ.get("SENTINEL_MODELS_DIR", "models"))
    args = ap.parse_args(argv)
    print("\n".join(summarise(ArtifactPaths(data_dir=Path(args.data_dir), models_dir=Path(args.models_dir)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
