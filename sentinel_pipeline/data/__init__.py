"""The data half, one module per stage, in pipeline order.

synthetic_market -> raw_bars -> features (+ feature_contract) -> labels -> splits -> scalers
-> hdf5_splits -> arrow_cache. No Dagster imports here.
"""
