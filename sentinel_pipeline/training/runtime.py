"""Runtime helpers for training: threads, memory limits, device choice and seeding.

- :func:`configure_threads` pins OpenMP/MKL/torch to a thread count (every training path calls it
  before any heavy torch work; ``None`` means :func:`default_thread_count`: the CPUs this process
  may actually use, cgroup quota included, that other work does not keep busy).
- :func:`cgroup_memory_limit_bytes` / :func:`available_memory_bytes` read the container's memory
  limit (cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, following this process's own
  cgroup from ``/proc/self/cgroup`` and taking the tightest limit up the hierarchy).
- :func:`select_device` turns ``"auto" | "cpu" | "cuda"`` into a ``torch.device``.
- :func:`seed_everything` seeds python, numpy and torch and switches on deterministic algorithms.

The cgroup readers take the cgroup mount point and the ``/proc/self/cgroup`` file as parameters so
tests can feed them a fake hierarchy.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import psutil
import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 reports "no limit" as a huge page-rounded number (e.g. 9223372036854771712)
_UNLIMITED_THRESHOLD = 1 << 60
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _own_cgroups(proc_self_cgroup: Path) -> dict[str, str]:
    """``{controller: path}`` from ``/proc/self/cgroup``; the cgroup v2 entry has the key ``""``."""
    out: dict[str, str] = {}
    try:
        text = proc_self_cgroup.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


def _chain(base: Path, rel: str) -> list[Path]:
    """Existing cgroup directories from ``base/rel`` up to ``base`` (deepest first)."""
    rel_parts = [p for p in rel.strip("/").split("/") if p]
    dirs = [base.joinpath(*rel_parts[:k]) for k in range(len(rel_parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup file; None when missing, ``max`` or unparseable."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _memory_files(cgroup_root: Path, proc_self_cgroup: Path) -> tuple[list[Path], str, str]:
    """The cgroup directories to read and the (limit, usage) file names, v2 preferred over v1."""
    own = _own_cgroups(proc_self_cgroup)
    v2 = _chain(cgroup_root, own.get("", "/"))
    if v2 and any((d / "memory.max").exists() for d in v2):
        return v2, "memory.max", "memory.current"
    v1_base = cgroup_root / "memory"
    return _chain(v1_base, own.get("memory", "/")), "memory.limit_in_bytes", "memory.usage_in_bytes"


def cgroup_memory_limit_bytes(
    cgroup_root: str | Path = CGROUP_ROOT, proc_self_cgroup: str | Path = PROC_SELF_CGROUP
) -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors; None when unlimited."""
    dirs, limit_name, _ = _memory_files(Path(cgroup_root), Path(proc_self_cgroup))
    limits = [
        v for v in (_read_int(d / limit_name) for d in dirs) if v is not None and v < _UNLIMITED_THRESHOLD
    ]
    return min(limits) if limits else None


def cgroup_memory_usage_bytes(
    cgroup_root: str | Path = CGROUP_ROOT, proc_self_cgroup: str | Path = PROC_SELF_CGROUP
) -> int | None:
    """Current memory usage of this process's cgroup (deepest cgroup that reports it); None if unknown."""
    dirs, _, usage_name = _memory_files(Path(cgroup_root), Path(proc_self_cgroup))
    for d in dirs:
        usage = _read_int(d / usage_name)
        if usage is not None:
            return usage
    return None


def available_memory_bytes(
    cgroup_root: str | Path = CGROUP_ROOT, proc_self_cgroup: str | Path = PROC_SELF_CGROUP
) -> int:
    """Memory this process can still use: min(cgroup limit - cgroup usage, psutil's available)."""
    available = int(psutil.virtual_memory().available)
    limit = cgroup_memory_limit_bytes(cgroup_root, proc_self_cgroup)
    if limit is not None:
        usage = cgroup_memory_usage_bytes(cgroup_root, proc_self_cgroup) or 0
        available = min(available, max(limit - usage, 0))
    return available


def cgroup_cpu_quota(
    cgroup_root: str | Path = CGROUP_ROOT, proc_self_cgroup: str | Path = PROC_SELF_CGROUP
) -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us/period``); None if none."""
    root, own = Path(cgroup_root), _own_cgroups(Path(proc_self_cgroup))
    quotas: list[float] = []
    for d in _chain(root, own.get("", "/")):
        try:
            fields = (d / "cpu.max").read_text(encoding="utf-8").split()
        except OSError:
            continue
        if len(fields) == 2 and fields[0] != "max":
            quotas.append(int(fields[0]) / int(fields[1]))
    if not quotas:
        for d in _chain(root / "cpu", own.get("cpu", "/")):
            quota, period = _read_int(d / "cpu.cfs_quota_us"), _read_int(d / "cpu.cfs_period_us")
            if quota is not None and quota > 0 and period:
                quotas.append(quota / period)
    return min(quotas) if quotas else None


def usable_cpu_count(
    cgroup_root: str | Path = CGROUP_ROOT, proc_self_cgroup: str | Path = PROC_SELF_CGROUP
) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup CPU quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


# the default never exceeds this: the variants' matrices are small, and past a few threads OpenMP's
# synchronisation costs more than the extra cores give
MAX_DEFAULT_THREADS = 8
# environment variable that pins default_thread_count
THREADS_ENV = "SENTINEL_TRAIN_THREADS"
# how long busy_cpus samples the CPUs' utilisation
BUSY_SAMPLE_SECONDS = 0.3


def busy_cpus(interval: float = BUSY_SAMPLE_SECONDS) -> float:
    """How many of this process's CPUs (its affinity mask) other work keeps busy right now: the summed
    utilisation of those CPUs over ``interval`` seconds (``psutil.cpu_percent(percpu=True)``), less
    this process's own CPU time in that window (it sleeps; its other threads may not)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = list(range(os.cpu_count() or 1))
    me = psutil.Process()
    own0 = sum(me.cpu_times()[:2])
    psutil.cpu_percent(percpu=True)
    time.sleep(interval)
    per_cpu = psutil.cpu_percent(percpu=True)
    own = max(0.0, sum(me.cpu_times()[:2]) - own0) / interval
    total = sum(per_cpu[c] for c in cpus if c < len(per_cpu)) / 100.0
    return max(0.0, total - own)


def default_thread_count(usable: int | None = None, busy: float | None = None) -> int:
    """Intra-op threads a training process uses when none are configured: the usable CPUs (cgroup
    quota and affinity included, :func:`usable_cpu_count`) that other work does not keep busy at
    the start (:func:`busy_cpus`, rounded), at least 1, at most :data:`MAX_DEFAULT_THREADS`.

    Why: on free cores every variant trains fastest with one thread per core (on 2 quiet cores 2
    threads gave 1.3-1.5x the samples/s of 1, ``bench/bench_step_costs.py``), while a thread count
    above the cores that are actually free is catastrophic for OpenMP (threads spin-wait for a core
    that is busy elsewhere: with one of 2 cores busy, 2 threads trained 3-8x slower than 1). So the
    count follows the free cores when a run starts. The engine records it in the run's resume state
    and a resumed run uses the count of the run it continues: results are bit-identical only at
    equal thread counts (the transformer's matmuls reduce in a different order on 2 threads).
    ``SENTINEL_TRAIN_THREADS`` pins the default to a fixed count (the test suite uses 1, so that two
    runs it compares never differ by the machine's load).
    """
    pinned = os.environ.get(THREADS_ENV, "").strip()
    if pinned and usable is None and busy is None:
        try:
            if int(pinned) >= 1:
                return int(pinned)
        except ValueError:
            pass
        raise ValueError(f"{THREADS_ENV}={pinned!r}: expected a thread count >= 1")
    n = usable_cpu_count() if usable is None else int(usable)
    b = busy_cpus() if busy is None else float(busy)
    free = n - int(math.floor(b + 0.5))
    return max(1, min(MAX_DEFAULT_THREADS, free))


def configure_threads(n_threads: int | None) -> int:
    """Use ``n_threads`` intra-op threads (None: :func:`default_thread_count`); returns the count.

    Sets ``OMP/MKL/OPENBLAS_NUM_THREADS`` (inherited by worker processes started later) and
    ``torch.set_num_threads`` for this process.
    """
    n = default_thread_count() if n_threads is None else int(n_threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n_threads}")
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    return n


def select_device(pref: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available else CPU; ``"cpu"``; ``"cuda"`` (an error when CUDA is absent)."""
    pref = str(pref).lower()
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device='cuda' was requested but CUDA is not available to torch "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                "use device='cpu' or 'auto', or install a CUDA build of torch"
            )
        return torch.device("cuda")
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise ValueError(f"unknown device preference {pref!r}; expected 'auto', 'cpu' or 'cuda'")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) and demand deterministic algorithms.

    On a CPU-only host ``torch.use_deterministic_algorithms(True, warn_only=False)``: an op without a
    deterministic kernel raises. Where CUDA is present the same flag is set with ``warn_only=True``
    (a few CUDA kernels have no deterministic variant), cuDNN is put in deterministic mode and
    ``CUBLAS_WORKSPACE_CONFIG`` is set so cuBLAS is reproducible.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True, warn_only=False)
