"""What the machine offers: usable CPUs (affinity, cgroup quota), torch threads, native bf16."""

import os

import pytest
import torch

from diffmine import machine


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cgroup_v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def test_usable_cpus_is_the_affinity_capped_by_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    assert machine.usable_cpus(tmp_path) == 8  # no cgroup file: the affinity alone
    assert machine.usable_cpus(_cgroup_v2(tmp_path, "max 100000\n")) == 8  # unlimited
    assert machine.usable_cpus(_cgroup_v2(tmp_path, "150000 100000\n")) == 2  # 1.5 CPUs: rounded up
    assert machine.usable_cpus(_cgroup_v2(tmp_path, "5000000 100000\n")) == 8  # quota above the affinity
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert machine.usable_cpus(tmp_path) == 1


def test_cgroup_v1_quota(tmp_path):
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert machine.cgroup_cpus(tmp_path) == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert machine.cgroup_cpus(tmp_path) is None


def test_set_threads_splits_the_cpus_between_data_parallel_processes(tmp_path, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    root = _cgroup_v2(tmp_path, "400000 100000\n")  # 4 CPUs of 8
    assert machine.set_threads(root=root, world=1) == 4 == torch.get_num_threads()
    assert machine.set_threads(root=root, world=2) == 2 == torch.get_num_threads()
    assert machine.set_threads(root=root, world=16) == 1  # never 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert machine.set_threads(root=root) == 1  # the launcher's world size
    assert machine.set_threads(6, root=root) == 1  # --threads 6 over 4 processes
    monkeypatch.delenv("WORLD_SIZE")
    assert machine.set_threads(3, root=root) == 3  # --threads wins over the quota
    with pytest.raises(ValueError, match="threads"):
        machine.set_threads(0, root=root)


def test_set_threads_keeps_an_explicit_omp_num_threads(monkeypatch, restore_threads):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert machine.set_threads() == 1


def test_auto_precision_resolves_to_bf16_only_where_native(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2", "avx512f"}))
    assert machine.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(machine, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx512f", "avx512_bf16"}))
    assert machine.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(machine, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"amx_bf16"}))
    assert machine.resolve_precision("auto", "cpu") == "bf16"
    assert machine.resolve_precision("fp32", "cpu") == "fp32"  # explicit values unchanged
    with pytest.raises(ValueError, match="precision"):
        machine.resolve_precision("int8")


def test_cpu_flags_parse_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512_bf16 amx_tile\n")
    assert {"avx512_bf16", "sse2"} <= machine.cpu_flags(str(info))
    assert machine.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_cli_threads_flag(tmp_path, monkeypatch, restore_threads):
    from diffmine import cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cli.main(["--threads", "1", "synth", "--out", str(tmp_path / "s"), "--labels", "2", "--per-label", "1", "--size", "32"])
    assert torch.get_num_threads() == 1
