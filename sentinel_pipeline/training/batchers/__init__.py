"""Batchers: turn a split's flat rows into model batches (one module per batch kind)."""
