"""The thin Dagster layer: assets, checks, jobs and schedules that wrap the pure stages.

Nothing here computes anything a stage module does not already compute: these wrappers resolve paths
(``PipelineSettings``), map Dagster ``Config`` onto stage configs, reuse fresh stages
(``stage_cache``), serialise writers on the instance lock, and turn stage reports into UI metadata.
"""
