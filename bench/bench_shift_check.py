"""Time and figures of the train/test shift check (adversarial validation) on a built data half.

``python bench/bench_shift_check.py --data-dir DIR`` (a data directory the data half has filled, e.g.
``python -m sentinel_pipeline.data_half --data-dir DIR`` on the default synthetic market). Prints the
load average, rows per side, AUC [CI] train-vs-val and train-vs-test, drift per group, the top
features, the trending features and the seconds taken; the reference in the same run is the same
classifier under shuffled random-row folds (the estimate time blocks replace).
"""

import argparse
import os
import time
from pathlib import Path

from sentinel_pipeline.data import arrow_cache
from sentinel_pipeline.evaluation import shift_check as sc
from sentinel_pipeline.paths import SPLITS, ArtifactPaths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--max-rows", type=int, default=sc.ShiftConfig.max_rows_per_side)
    a = p.parse_args()
    print(f"load average {os.getloadavg()}")
    paths = ArtifactPaths(data_dir=Path(a.data_dir))
    splits = {s: arrow_cache.open_split(paths.arrow(s)) for s in SPLITS}
    cfg = sc.ShiftConfig(max_rows_per_side=a.max_rows)
    t0 = time.perf_counter()
    reports = sc.shift_check(splits, cfg)
    total = time.perf_counter() - t0
    for name, r in reports.items():
        print(f"{name}: AUC {r.auc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] ({sc.CI_METHOD}); rows "
              f"{r.n_train_rows} vs {r.n_later_rows}, {r.n_blocks} blocks, {r.n_folds} folds; {r.seconds:.1f} s")
        print("  drift per group: " + ", ".join(f"{g['group']} {g['auc']:.3f}" for g in r.groups))
        print("  top features: " + ", ".join(f"{t['feature']} {t['importance']:.3f}" for t in r.top_features[:5]))
        print("  trending: " + (", ".join(f"{t['feature']} {t['spearman']:.2f}" for t in r.trending) or "none"))
    print(f"shift check total: {total:.1f} s")
    train = sc.side_from_split(splits["train"])
    t0 = time.perf_counter()
    shuffled = sc.random_row_cv_auc(train, sc.side_from_split(splits["val"]), cfg)
    print(f"reference, shuffled random-row folds, train_vs_val: AUC {shuffled:.3f} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
