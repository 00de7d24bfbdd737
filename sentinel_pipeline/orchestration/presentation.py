"""How every asset and check of the code location presents itself, applied in one place.

:func:`present` takes an asset or asset-check definition and returns the same definition (same keys,
specs, config, resources, pools) whose step

- reports its metadata rounded for reading (:func:`metadata.readable`: ``63.209291190000044`` ->
  ``63.21``); the stage code and the files on disk keep full precision;
- fails with the one-line cause first: the pipeline's known errors (``ValueError`` and its
  subclasses such as ``BundleError``/``ContractError``/``RawDataError``, ``OSError`` such as
  ``FileNotFoundError``, a full disk or ``LockTimeout``, ``MemoryError``, a diverged training run)
  become a ``dagster.Failure`` whose description is ``<ErrorType>: <message>``, with the traceback
  kept in the failure's metadata and in the debug log instead of 150 lines in front of the cause.
  Other exceptions (programming errors) keep Dagster's full report;
- carries a step priority (the ``dagster/priority`` tag, :func:`step_priority`): among the steps
  that are ready, the run executes the checks of a new bundle and its replay and backtest before it
  trains the next variant, so each bundle is verified as soon as it exists instead of after all
  variants have trained (Dagster's executors pick ready steps by that tag, highest first).

The definitions are rebuilt with the same op and asset attributes (Dagster 1.13's
``OpDefinition.dagster_internal_init`` / ``AssetsDefinition.get_attributes_dict``, the same route
Dagster's own ``with_attributes`` takes); ``test_presentation.py`` pins the behaviour.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
from dagster._core.definitions.decorators.op_decorator import DecoratedOpFunction
from dagster._core.storage.tags import PRIORITY_TAG

from sentinel_pipeline.orchestration.metadata import readable

log = logging.getLogger(__name__)

# errors the stages raise on purpose, with a message written for the user
KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError)
try:  # a diverged or failed training run (RuntimeError subclass, raised with a readable message)
    from sentinel_pipeline.training.engine import TrainingError

    KNOWN_ERRORS = (*KNOWN_ERRORS, TrainingError)
except ImportError:  # pragma: no cover - the engine is part of the package
    pass

# step priorities: verify (and replay, backtest) a trained bundle before training the next variant
PRIORITY_CHECK_OF_TRAINED = 30  # checks of bundles, replays and backtests
PRIORITY_CONSUMER = 20  # replay_<variant>, backtest_<variant>, model_final_<variant>
PRIORITY_DEFAULT = 0
_TRAINED_PREFIXES = ("bundle_", "replay_", "backtest_")
_CONSUMER_PREFIXES = ("replay_", "backtest_", "model_final_")


def step_priority(asset_keys: list[str], check_asset_keys: list[str]) -> int:
    """The ``dagster/priority`` of a step materialising ``asset_keys`` / checking ``check_asset_keys``."""
    if asset_keys:
        return PRIORITY_CONSUMER if all(k.startswith(_CONSUMER_PREFIXES) for k in asset_keys) else PRIORITY_DEFAULT
    if check_asset_keys and all(k.startswith(_TRAINED_PREFIXES) for k in check_asset_keys):
        return PRIORITY_CHECK_OF_TRAINED
    return PRIORITY_DEFAULT


def one_line(exc: BaseException) -> str:
    """``<ErrorType>: <first line of the message>`` (the message's other lines follow in the failure)."""
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}"


def failure_from(exc: BaseException, stage: str) -> dg.Failure:
    """A ``dagster.Failure`` that leads with the cause; the traceback goes into its metadata."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    log.debug("%s failed:\n%s", stage, tb)
    return dg.Failure(
        description=one_line(exc),
        metadata={
            "stage": stage,
            "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "traceback": dg.MetadataValue.md(f"```\n{tb}\n```"),
        },
        allow_retries=False,
    )


def _readable_result(value: Any) -> Any:
    """Round the metadata of a result the step returns or yields (other values unchanged)."""
    if isinstance(value, dg.MaterializeResult | dg.ObserveResult | dg.AssetCheckResult):
        if getattr(value, "metadata", None):
            return value._replace(metadata=readable(value.metadata))
        return value
    if isinstance(value, tuple | list):
        return type(value)(_readable_result(v) for v in value)
    return value


def _wrap_compute(fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                for item in fn(*args, **kwargs):
                    yield _readable_result(item)
            except dg.Failure:
                raise
            except KNOWN_ERRORS as exc:
                raise failure_from(exc, stage) from None  # the traceback is in the metadata

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return _readable_result(fn(*args, **kwargs))
        except dg.Failure:
            raise
        except KNOWN_ERRORS as exc:
            raise failure_from(exc, stage) from None  # the traceback is in the metadata

    return wrapper


def _present_op(op: dg.OpDefinition, priority: int) -> dg.OpDefinition:
    tags = dict(op.tags)
    if priority != PRIORITY_DEFAULT:
        tags.setdefault(PRIORITY_TAG, str(priority))
    return dg.OpDefinition.dagster_internal_init(
        compute_fn=DecoratedOpFunction(_wrap_compute(op.compute_fn.decorated_fn, op.name)),
        name=op.name,
        ins={d.name: dg.In.from_definition(d) for d in op.input_defs},
        outs={d.name: dg.Out.from_definition(d) for d in op.output_defs},
        description=op.description,
        config_schema=op.config_schema,
        required_resource_keys=op.required_resource_keys,
        tags=tags,
        version=None,
        retry_policy=op.retry_policy,
        code_version=getattr(op, "_version", None),
        pool=op.pool,
    )


def present(definition: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """``definition`` with readable metadata, leading error messages and its step priority."""
    op = definition.node_def
    if not isinstance(op, dg.OpDefinition) or not isinstance(op.compute_fn, DecoratedOpFunction):
        return definition  # graph-backed or non-decorated definitions are left as they are
    priority = step_priority(
        [k.to_user_string() for k in definition.keys],
        [k.asset_key.to_user_string() for k in definition.check_keys],
    )
    attributes = definition.get_attributes_dict()
    attributes["node_def"] = _present_op(op, priority)
    with warnings.catch_warnings():  # Dagster's own with_attributes passes the same (beta) parameters
        warnings.simplefilter("ignore", category=dg.BetaWarning)
        warnings.simplefilter("ignore", category=dg.PreviewWarning)
        return definition.__class__(**attributes)
