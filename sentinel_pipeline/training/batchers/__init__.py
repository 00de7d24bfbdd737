"""Batchers: each turns a split's flat rows into the batches of one batch kind (``windows.py``: one
sequence window per sample). A batcher has ``len()``, ``batch(i)``, ``set_epoch(e)`` and ``n_samples``
(``families.base.Batcher``)."""
