"""The resource that says where a pipeline instance lives."""


import os
from pathlib import Path

import dagster as dg

from sentinel_pipeline.paths import ArtifactPaths

# every asset that writes shared artefacts runs in this concurrency pool (limit 1, see dagster.yaml)
WRITE_POOL = "sentinel_writes"


class PipelineSettings(dg.ConfigurableResource):
    """Directories of the pipeline instance. Defaults come from env vars so tests and CI can redirect them."""

    data_dir: str = os.environ.get("SENTINEL_DATA_DIR", "data")
    models_dir: str = os.environ.get("SENTINEL_MODELS_DIR", "models")
    # raw input: a folder of parquet/CSV files or one such file (e.g. a daily panel beside other files)
    raw_dir: str | None = os.environ.get("SENTINEL_RAW_DIR") or None

    def paths(self) -> ArtifactPaths:
        return ArtifactPaths(
            data_dir=Path(self.data_dir),
            models_dir=Path(self.models_dir),
            raw_dir_override=Path(self.raw_dir) if self.raw_dir else None,
        )
