"""A bundle's ``model.onnx`` on ONNX Runtime, behind the same call as its torch model.

:class:`OnnxModel` is called like the torch model (``model(batch) -> {head name: tensor}``, plus
``eval()``), so scoring (``evaluation.predictions.score_split``), the test-period backtest and the replay
run it unchanged, and the signal is computed from its head outputs by the same family code as for
torch (the graph's own ``signal`` output is checked against it by the parity check).

Loading is part of the trust boundary (``bundles.load_bundle(runtime="onnx")``): the file's bytes are
read once (no symlink followed), their sha256 must be the one in the signed manifest, and the session
is built from those bytes, so the file cannot be swapped between the check and the load. A graph that
references external data (which ONNX resolves as paths, possibly outside the bundle), uses an operator
domain other than the standard ones, or whose inputs/outputs are not the ones recorded in
``bundle_metadata.json["onnx"]`` is refused. No custom-op library is ever registered: ONNX Runtime
runs only its built-in kernels, so a model file cannot execute code.

Threads: :data:`DEFAULT_ORT_THREADS` (1 intra-op, 1 inter-op, sequential execution), the fixed setting
under which parity is checked; ``threads`` may raise the intra-op count for throughput.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
DEFAULT_ORT_THREADS = 1
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class OnnxModelError(ValueError):
    """``model.onnx`` cannot be run (message names the file and the problem)."""


def check_graph(data: bytes, where: str) -> Any:
    """The parsed ONNX model of ``data``; raises :class:`OnnxModelError` for external data or an operator
    domain outside :data:`ALLOWED_DOMAINS` (in the graph or in its local functions)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # a damaged or hostile file: report, never crash the caller
        raise OnnxModelError(f"{where}: not a readable ONNX model: {exc}") from exc
    external = [t.name for t in proto.graph.initializer if uses_external_data(t)]
    if external:
        raise OnnxModelError(f"{where}: tensors {external[:5]} reference external data files; a bundle's "
                             "model.onnx must be self-contained")
    domains = {op.domain for op in proto.opset_import} | {n.domain for n in proto.graph.node}
    for fn in proto.functions:
        domains |= {n.domain for n in fn.node}
    local = {fn.domain for fn in proto.functions}
    bad = sorted(d for d in domains - local if d not in ALLOWED_DOMAINS)
    if bad:
        raise OnnxModelError(f"{where}: operator domains {bad} are not standard ONNX (allowed: "
                             f"{sorted(ALLOWED_DOMAINS)}); custom operators are never loaded")
    return proto


class OnnxModel:
    """``model.onnx`` on ONNX Runtime's CPU provider, called like the torch model (see the module
    docstring). ``data``: the file's bytes (already checked against the manifest by the caller);
    ``signature``: ``bundle_metadata.json["onnx"]`` (inputs and outputs the graph must have)."""

    def __init__(self, data: bytes, signature: Mapping[str, Any], *, where: str = "model.onnx",
                 threads: int = DEFAULT_ORT_THREADS) -> None:
        import onnxruntime as ort

        check_graph(data, where)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise OnnxModelError(f"{where}: ONNX Runtime cannot load it: {exc}") from exc
        self.where = where
        self.threads = max(1, int(threads))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        want_in = [str(i["name"]) for i in signature.get("inputs", [])]
        want_out = [str(o["name"]) for o in signature.get("outputs", [])]
        if self.input_names != want_in or self.output_names != want_out:
            raise OnnxModelError(f"{where}: graph inputs {self.input_names} / outputs {self.output_names} are not "
                                 f"the recorded {want_in} / {want_out}")
        self._dtypes = {i.name: _NUMPY_DTYPES.get(i.type) for i in self.session.get_inputs()}
        self.training = False

    @classmethod
    def from_file(cls, path: str | Path, signature: Mapping[str, Any], *, expected_sha256: str | None = None,
                  threads: int = DEFAULT_ORT_THREADS) -> OnnxModel:
        """Read ``path`` once (no symlink followed), check its sha256 when given, load from the bytes."""
        from sentinel_pipeline.safe_read import read_regular

        data = read_regular(path)
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise OnnxModelError(f"{path}: sha256 differs from the signed manifest's")
        return cls(data, signature, where=str(path), threads=threads)

    # the torch-model surface the scoring code uses
    def eval(self) -> OnnxModel:
        return self

    def run(self, batch: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Every (or the named) output of the graph on ``batch`` (tensors or arrays), as NumPy."""
        feeds = {}
        for name in self.input_names:
            if name not in batch:
                raise OnnxModelError(f"{self.where}: the batch has no {name!r} (has {sorted(batch)})")
            value = batch[name]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            dtype = self._dtypes.get(name)
            feeds[name] = np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))
        names = list(outputs) if outputs is not None else self.output_names
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The head outputs (every output but ``signal``) as torch tensors, like the torch model's."""
        from sentinel_pipeline.deployment.onnx_export import SIGNAL_OUTPUT

        heads = [n for n in self.output_names if n != SIGNAL_OUTPUT]
        return {k: torch.from_numpy(v) for k, v in self.run(batch, heads).items()}
