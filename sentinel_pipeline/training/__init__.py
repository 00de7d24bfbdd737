"""The training engine: plain Python + torch, no Dagster (the orchestration layer wraps it).

Modules (import them directly; this package imports nothing heavy on its own):

- ``runtime``      threads, cgroup memory limits, device selection, seeding/determinism
- ``data_loader``  opening a split (Arrow cache or HDF5), feeding a batcher's batches to the device
- ``batchers``     one batcher per batch kind (``windows``: lazy sequence windows per sample)
- ``families``     model families (protocol in ``families/base.py``, registry in ``families/__init__``):
                   batch kind, variants, model builder, heads, losses, metrics, signal
- ``models``       the variant registry under its old name (re-exports ``families``)
- ``optim``        typed optimizer (AdamW, AdaBelief) and scheduler configuration
- ``losses``       per-head losses (MSE, cross-entropy, focal) and class weights
- ``evaluation``   regression (MSE, IC, rank IC, ICIR) and classification metrics with baselines
- ``config``       ``TrainConfig``: the training run's configuration (file + CLI overrides)
- ``engine``       ``train()``: the one training loop used by the CLI, Dagster and tests
- ``checkpoints``  saving and resuming training state
- ``plots``        training curves
"""
