"""sentinel-pipeline: market bars to verified, trained and replayed PyTorch model bundles.

Layout (the pipeline's stages, in order):

- ``sentinel_pipeline.data``      raw bars -> features + contract -> labels -> splits -> scalers -> HDF5 -> Arrow
- ``sentinel_pipeline.training``  the training engine (loader, models, losses, loop, checkpoints)
- ``sentinel_pipeline.bundles``   self-describing, sha256-manifested model bundles
- ``sentinel_pipeline.verification`` / ``replay``  the gate and the production-style replay
- ``sentinel_pipeline.orchestration`` the thin Dagster layer (assets, checks, schedules)

Everything outside ``orchestration`` and ``definitions`` is plain Python without Dagster imports.
"""

__version__ = "0.1.0"
