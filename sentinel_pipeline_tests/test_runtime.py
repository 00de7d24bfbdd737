"""Runtime helpers: cgroup parsing on fake hierarchies, device selection, threads, seeding."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from sentinel_pipeline.training import runtime
from sentinel_pipeline.training.runtime import (
    available_memory_bytes,
    cgroup_cpu_quota,
    cgroup_memory_limit_bytes,
    configure_threads,
    seed_everything,
    select_device,
    usable_cpu_count,
)

GiB = 1 << 30


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _proc(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "proc_self_cgroup"
    p.write_text(text)
    return p


def _fake_available(monkeypatch, available: int) -> None:
    monkeypatch.setattr(runtime.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))


def test_cgroup_v2_limit_usage_and_hierarchy(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "cpu memory pids")
    _write(root / "memory.max", str(8 * GiB))  # the parent is tighter than the leaf
    _write(root / "job" / "memory.max", str(16 * GiB))
    _write(root / "job" / "memory.current", str(3 * GiB))
    _write(root / "job" / "cpu.max", "150000 100000")
    proc = _proc(tmp_path, "0::/job\n")
    assert cgroup_memory_limit_bytes(root, proc) == 8 * GiB
    assert runtime.cgroup_memory_usage_bytes(root, proc) == 3 * GiB
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.5)
    assert usable_cpu_count(root, proc) == min(2, len(os.sched_getaffinity(0)))
    _fake_available(monkeypatch, 64 * GiB)
    assert available_memory_bytes(root, proc) == 5 * GiB  # limit - usage
    _fake_available(monkeypatch, 2 * GiB)
    assert available_memory_bytes(root, proc) == 2 * GiB  # the host has less than the cgroup allows
    _write(root / "job" / "memory.current", str(9 * GiB))
    assert available_memory_bytes(root, proc) == 0  # usage above the limit: nothing left, never negative


def test_cgroup_v2_unlimited(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    _write(root / "memory.max", "max")
    _write(root / "memory.current", "12345")
    _write(root / "cpu.max", "max 100000")
    proc = _proc(tmp_path, "0::/\n")
    assert cgroup_memory_limit_bytes(root, proc) is None
    assert cgroup_cpu_quota(root, proc) is None
    _fake_available(monkeypatch, 3 * GiB)
    assert available_memory_bytes(root, proc) == 3 * GiB


def test_cgroup_v1_limit_and_unlimited_sentinel(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712")  # v1 "unlimited"
    _write(root / "memory" / "box" / "memory.limit_in_bytes", str(2 * GiB))
    _write(root / "memory" / "box" / "memory.usage_in_bytes", str(GiB // 2))
    _write(root / "cpu" / "box" / "cpu.cfs_quota_us", "300000")
    _write(root / "cpu" / "box" / "cpu.cfs_period_us", "100000")
    proc = _proc(tmp_path, "9:name=systemd:/\n4:memory:/box\n1:cpu,cpuacct:/box\n0::/\n")
    assert cgroup_memory_limit_bytes(root, proc) == 2 * GiB
    assert runtime.cgroup_memory_usage_bytes(root, proc) == GiB // 2
    assert cgroup_cpu_quota(root, proc) == pytest.approx(3.0)
    _fake_available(monkeypatch, 64 * GiB)
    assert available_memory_bytes(root, proc) == 2 * GiB - GiB // 2
    # the same hierarchy without the per-box limit: unlimited
    (root / "memory" / "box" / "memory.limit_in_bytes").unlink()
    assert cgroup_memory_limit_bytes(root, proc) is None


def test_cgroup_missing_or_garbage_files(tmp_path):
    assert cgroup_memory_limit_bytes(tmp_path / "nothing", tmp_path / "no_proc") is None
    root = tmp_path / "cg"
    _write(root / "memory.max", "not a number")
    assert cgroup_memory_limit_bytes(root, _proc(tmp_path, "0::/\n")) is None
    # a cgroup path that is not visible in this mount namespace falls back to the mount root
    _write(root / "memory.max", str(GiB))
    assert cgroup_memory_limit_bytes(root, _proc(tmp_path, "0::/elsewhere/deep\n")) == GiB


def test_real_host_values_are_sane():
    limit = cgroup_memory_limit_bytes()
    assert limit is None or limit > 0
    assert 0 < available_memory_bytes() <= psutil.virtual_memory().total
    assert usable_cpu_count() >= 1


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    auto = select_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")


def test_select_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a host that has CUDA
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        select_device("cuda")
    assert select_device("auto") == torch.device("cpu")


def test_configure_threads(monkeypatch):
    before = torch.get_num_threads()
    for var in runtime.THREAD_ENV_VARS:
        monkeypatch.setenv(var, "7")
    try:
        configure_threads(1)
        assert torch.get_num_threads() == 1
        assert all(os.environ[v] == "1" for v in runtime.THREAD_ENV_VARS)
        assert configure_threads(None) == runtime.default_thread_count()
        assert torch.get_num_threads() == runtime.default_thread_count()
        with pytest.raises(ValueError):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_seed_everything_reproduces_all_generators():
    try:
        draws = []
        for _ in range(2):
            seed_everything(42)
            draws.append((random.random(), np.random.rand(), torch.rand(3)))
        assert draws[0][0] == draws[1][0] and draws[0][1] == draws[1][1]
        assert torch.equal(draws[0][2], draws[1][2])
        assert torch.are_deterministic_algorithms_enabled()
        if not torch.cuda.is_available():
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_default_thread_count_is_the_free_usable_cpus_capped(monkeypatch):
    """One thread per free core is fastest (bench/bench_step_costs.py); a thread on a core that other work
    keeps busy is catastrophic for OpenMP (2 threads on a 2-core machine with one core busy: 3-8x slower
    than 1, bench/README.md), so the default counts only the CPUs that are free when training starts."""
    assert [runtime.default_thread_count(n, busy=0.0) for n in (1, 2, 3, 4, 8, 16, 64)] == [1, 2, 3, 4, 8, 8, 8]
    assert [runtime.default_thread_count(2, busy=b) for b in (0.4, 0.6, 1.0, 1.7, 2.0, 9.0)] == [2, 1, 1, 1, 1, 1]
    assert runtime.default_thread_count(8, busy=2.6) == 5
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.setattr(runtime, "usable_cpu_count", lambda *a, **k: 2)  # e.g. a cgroup quota of 2 CPUs
    monkeypatch.setattr(runtime, "busy_cpus", lambda *a, **k: 1.2)  # one of them busy elsewhere
    assert runtime.default_thread_count() == 1
    monkeypatch.setattr(runtime, "busy_cpus", lambda *a, **k: 0.1)
    assert runtime.default_thread_count() == 2
    monkeypatch.setenv(runtime.THREADS_ENV, "3")  # pinned
    assert runtime.default_thread_count() == 3
    monkeypatch.setenv(runtime.THREADS_ENV, "0")
    with pytest.raises(ValueError, match="SENTINEL_TRAIN_THREADS"):
        runtime.default_thread_count()


def test_busy_cpus_sees_a_spinning_process_and_not_itself():
    n = len(os.sched_getaffinity(0))
    idle = runtime.busy_cpus(0.3)
    assert 0.0 <= idle <= n
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = runtime.busy_cpus(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.6, f"a spinning process kept a CPU busy but busy_cpus saw {busy:.2f}"
    assert busy <= n
