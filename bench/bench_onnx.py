"""ONNX Runtime against PyTorch: inference throughput per variant on CPU, at batch 1 and batch 256.

Every registered variant at its default architecture on the default intraday feature contract
(``FeatureConfig()``; the graph family on the same widths, a "batch" being that many nodes of one day
with 4 edges per node), random weights (throughput does not depend on their values). Ours: the model
exported by ``deployment.onnx_export.export_onnx`` (the bundle's ``model.onnx``) run by ONNX Runtime's
CPU provider through ``session.run`` on NumPy inputs. Reference, in the same process, interleaved:
the torch model in eval mode under ``torch.inference_mode()`` on the same inputs as tensors. Both at
``--threads`` intra-op threads (default 1: the parity check's setting; 1 inter-op thread). Median of
``--rounds`` rounds of ``--seconds`` each; the largest difference of the signal between the two is
printed beside the speeds.

    python bench/bench_onnx.py [--quick] [--threads 1] [--rounds 5] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rate(fn, n: int, seconds: float) -> float:
    fn()  # warm-up
    calls, tic = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - tic
        if elapsed >= seconds:
            return calls * n / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 0.3 s")
    args = ap.parse_args()
    rounds, seconds = (2, 0.3) if args.quick else (args.rounds, args.seconds)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from sentinel_pipeline.data.features import FeatureConfig, build_contract
    from sentinel_pipeline.deployment.onnx_export import SIGNAL_OUTPUT, export_onnx
    from sentinel_pipeline.deployment.onnx_model import OnnxModel
    from sentinel_pipeline.training.families import VARIANTS, build_model, get_family, resolve_arch

    torch.set_num_threads(args.threads)
    contract = build_contract(FeatureConfig())
    dims = contract.dims()
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    print(f"torch {torch.__version__}, {args.threads} intra-op thread(s) each; contract seq_len {contract.seq_len}, "
          f"dims {dims}; median of {rounds} rounds x {seconds} s\n")
    print(f"{'variant':<20} {'batch':>5} {'torch samples/s':>16} {'ORT samples/s':>14} {'ORT / torch':>11} "
          f"{'max |signal diff|':>18}")
    exports: list[str] = []
    for variant, spec in VARIANTS.items():
        family = get_family(spec.family)
        arch = resolve_arch(variant, dims, contract.ctx_cat_cardinalities, contract.seq_len)
        torch.manual_seed(0)
        model = build_model(arch).eval()
        result = export_onnx(model, arch, dims, work / f"{variant}.onnx")
        if not result.exported:
            print(f"{variant:<20} export failed: {result.reason}")
            continue
        ort_model = OnnxModel.from_file(work / f"{variant}.onnx", result.to_metadata(), threads=args.threads)
        exports.append(f"{variant} {result.seconds:.1f} s, {(work / f'{variant}.onnx').stat().st_size / 1024:.0f} KiB")
        g = torch.Generator().manual_seed(1)
        for n in (1, 256):
            batch = {"seq": torch.randn(n, contract.seq_len, dims["seq"], generator=g),
                     "snap": torch.randn(n, dims["snap"], generator=g),
                     "ctx_cat": torch.stack([torch.randint(0, c, (n,), generator=g)
                                             for c in contract.ctx_cat_cardinalities], 1),
                     "ctx_cont": torch.randn(n, dims["ctx_cont"], generator=g)}
            if spec.batch_kind == "days":
                edges = 4 * n
                batch["edge_index"] = torch.randint(0, n, (2, edges), generator=g)
                batch["edge_weight"] = torch.rand(edges, generator=g) + 0.1
            feeds = {name: batch[name].numpy() for name in ort_model.input_names}
            session = ort_model.session

            def run_torch(batch=batch, model=model) -> None:
                with torch.inference_mode():
                    model(batch)

            def run_ort(feeds=feeds, session=session) -> None:
                session.run(None, feeds)

            t_rates, o_rates = [], []
            for _ in range(rounds):
                t_rates.append(_rate(run_torch, n, seconds))
                o_rates.append(_rate(run_ort, n, seconds))
            with torch.inference_mode():
                expected = family.signal(spec, model(batch)).numpy()
            got = ort_model.run(batch, [SIGNAL_OUTPUT])[SIGNAL_OUTPUT]
            t, o = statistics.median(t_rates), statistics.median(o_rates)
            print(f"{variant:<20} {n:>5} {t:>16,.0f} {o:>14,.0f} {o / t:>10.2f}x "
                  f"{float(np.abs(got - expected).max()):>18.2e}")
    print("\nexport (torch.onnx dynamo, opset 18) time and file size: " + "; ".join(exports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
