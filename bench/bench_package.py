"""model_final.zip: packaging (trust checks + deterministic archive) and safe unpacking, against plain zipfile.

A signed synthetic bundle (a checkpoint of ``--mb`` MB of float32 noise, which compresses like real
weights, plus the other bundle files) under a temporary key. Ours: ``package.package_bundle`` (signature,
entry rule, sha256 manifest, then the archive with each file hashed as it is copied, read back under the
unpacking rules) and ``bundle_archive.unpacked_bundle``. Reference, in the same process, interleaved:
``zipfile.ZipFile.write`` of the same files at the same deflate level, and ``ZipFile.extractall``
(no checks at all). Median of ``--rounds`` rounds each.

    python bench/bench_package.py [--quick] [--mb 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="checkpoint size in MB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 MB, 3 rounds")
    args = ap.parse_args()
    mb, rounds = (2.0, 3) if args.quick else (args.mb, args.rounds)
    work = Path(tempfile.mkdtemp(prefix="bench-package-"))
    os.environ["SENTINEL_SIGNING_KEY"] = str(work / "keys" / "signing_key.pem")
    os.environ["SENTINEL_TRUSTED_KEYS"] = str(work / "keys" / "trusted_keys")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sentinel_pipeline.bundle_archive import unpacked_bundle
    from sentinel_pipeline.bundles import BUNDLE_FILES, METADATA_NAME, build_manifest
    from sentinel_pipeline.package import COMPRESS_LEVEL, package_bundle
    from sentinel_pipeline.signing import MANIFEST_NAME, load_signing_key, sign_manifest

    try:
        bundle = work / "models" / "mlp_two_head__20240102T000000Z__0123456789abcdef"
        bundle.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for name in BUNDLE_FILES:
            if name == "model_best.pt":
                (bundle / name).write_bytes(rng.standard_normal(int(mb * 2**20) // 4).astype(np.float32).tobytes())
            else:
                (bundle / name).write_text("\n".join(f"epoch {i} loss {rng.random():.6f}" for i in range(200)))
        (bundle / METADATA_NAME).write_text(json.dumps({"bundle_format_version": 2, "model_family": "window_models",
                                                         "model_variant": "mlp_two_head", "batch_kind": "windows"}))
        (bundle / MANIFEST_NAME).write_text(json.dumps(build_manifest(bundle)))
        sign_manifest(bundle, load_signing_key())
        files = sorted(p for p in bundle.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)

        def ours_pack() -> Path:
            return package_bundle(bundle, work / "ours" / "model_final.zip").path

        def ref_pack() -> Path:
            out = work / "ref.zip"
            with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL) as zf:
                for p in files:
                    zf.write(p, p.name)
            return out

        def ours_unpack() -> None:
            with unpacked_bundle(work / "ours" / "model_final.zip"):
                pass

        def ref_unpack() -> None:
            dest = work / "ref_out"
            with zipfile.ZipFile(work / "ref.zip") as zf:
                zf.extractall(dest)
            shutil.rmtree(dest)

        times: dict[str, list[float]] = {k: [] for k in ("ours_pack", "ref_pack", "ours_unpack", "ref_unpack")}
        fns = {"ours_pack": ours_pack, "ref_pack": ref_pack, "ours_unpack": ours_unpack, "ref_unpack": ref_unpack}
        ours_pack(), ref_pack()  # warm the page cache
        for _ in range(rounds):
            for key in times:  # interleaved: a busy machine slows both sides alike
                t0 = time.perf_counter()
                fns[key]()
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        size = (work / "ours" / "model_final.zip").stat().st_size
        print(f"# bench_package: load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, "
              f"{len(files)} files, {total / 2**20:.1f} MiB, {rounds} rounds (median)")
        print(f"package_bundle (trust checks + archive + read-back) {med['ours_pack'] * 1e3:8.1f} ms   "
              f"reference zipfile.write {med['ref_pack'] * 1e3:8.1f} ms   ratio {med['ours_pack'] / med['ref_pack']:.2f}")
        print(f"unpacked_bundle (rules + capped read)               {med['ours_unpack'] * 1e3:8.1f} ms   "
              f"reference extractall    {med['ref_unpack'] * 1e3:8.1f} ms   ratio "
              f"{med['ours_unpack'] / med['ref_unpack']:.2f}")
        print(f"archive {size / 2**20:.2f} MiB ({size / total:.2f} of the files)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
