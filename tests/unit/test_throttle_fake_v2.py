"""The cgroup v2 backend against a fake cgroupfs tree in tmp_path (see fake_cgroup2.py), since
this host is v1. What the kernel would reject, the fake rejects too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.errors import ConfigError, OrchardError
from testbed import cgroup_backends
from testbed.cgroup_backends import V2Group, registered_groups
from testbed.cgroups import MIB, run_id_for
from testbed.throttle import NullThrottle, cleanup_all, detect_throttle
from tests.unit.fake_cgroup2 import FakeCgroup2

PREFIX = "orchard-fake"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeCgroup2]:
    fs = FakeCgroup2(tmp_path / "cgroup")
    yield fs
    cleanup_all(PREFIX, str(fs.root), fs=fs)  # also drops anything a failed test left registered


def _throttle(fs: FakeCgroup2, **kw: object) -> cgroup_backends.V2Throttle:
    t = detect_throttle(str(fs.root), PREFIX, run_id="run1", host_cores=4, fs=fs, **kw)  # type: ignore[arg-type]
    assert isinstance(t, cgroup_backends.V2Throttle)
    return t


def test_detects_v2_and_detection_leaves_nothing_behind(fake: FakeCgroup2) -> None:
    t = _throttle(fake)
    assert (t.backend, t.warning, t.controllers) == ("cgroup2", None, ("cpu", "memory"))
    assert not (fake.root / PREFIX).exists()


def test_create_enables_controllers_on_the_way_down_and_writes_limits(fake: FakeCgroup2) -> None:
    group = _throttle(fake).create("rpi4-01", cpu_quota_cores=0.25, mem_limit_mb=64)
    leaf = fake.root / PREFIX / "run1" / "rpi4-01"
    assert group.path == str(leaf)
    for level in ("", PREFIX, f"{PREFIX}/run1"):
        assert fake.text(os.path.join(level, "cgroup.subtree_control")).split() == ["cpu", "memory"]
    assert fake.text(f"{PREFIX}/run1/rpi4-01/cpu.max") == "2500 10000"  # periods follow the quota
    group.set_cpu_weight(0.25)
    assert fake.text(f"{PREFIX}/run1/rpi4-01/cpu.weight") == "250"  # in proportion to the quota
    assert fake.text(f"{PREFIX}/run1/rpi4-01/memory.max") == str(64 * MIB)
    assert fake.text(f"{PREFIX}/run1/rpi4-01/memory.swap.max") == "0"  # swap must not hide the cap
    assert (group.cpu_quota_cores, group.mem_limit_mb) == (0.25, 64)


def test_cpu_weights_follow_quotas_and_the_run_tree_gets_the_top_weight(fake: FakeCgroup2) -> None:
    t = _throttle(fake)
    a, b = t.create("a", 0.05, None), t.create("b", 0.2, None)
    a.set_cpu_weight(0.05)
    b.set_cpu_weight(0.2)
    assert (fake.text(f"{PREFIX}/run1/a/cpu.weight"), fake.text(f"{PREFIX}/run1/b/cpu.weight")) == ("50", "200")
    t.prioritise_cpu()
    assert fake.text(f"{PREFIX}/cpu.weight") == fake.text(f"{PREFIX}/run1/cpu.weight") == "10000"
    with pytest.raises(ConfigError, match="CPU weight 0 cores"):
        a.set_cpu_weight(0)


def test_limits_are_rewritten_live(fake: FakeCgroup2) -> None:
    group = _throttle(fake).create("d", cpu_quota_cores=None, mem_limit_mb=None)
    rel = f"{PREFIX}/run1/d"
    assert (fake.text(f"{rel}/cpu.max"), fake.text(f"{rel}/memory.max")) == ("max 100000", "max")
    group.set_cpu_quota(1.5)
    assert fake.text(f"{rel}/cpu.max") == "15000 10000"  # more than one core: quota > period
    group.set_cpu_quota(0.05)
    assert fake.text(f"{rel}/cpu.max") == "2000 40000"  # small quotas: longer periods, the same 2 ms burst
    group.set_cpu_quota(0.0001)
    assert fake.text(f"{rel}/cpu.max") == "1000 1000000"  # floored at the kernel's 1 ms minimum
    group.set_cpu_quota(4)
    assert fake.text(f"{rel}/cpu.max") == "40000 10000"  # all host cores is allowed
    group.set_cpu_quota(None)
    assert fake.text(f"{rel}/cpu.max") == "max 100000"
    group.set_mem_limit(512)
    assert fake.text(f"{rel}/memory.max") == str(512 * MIB)
    group.set_mem_limit(None)
    assert fake.text(f"{rel}/memory.max") == "max"


@pytest.mark.parametrize("cores", [0, -0.5, float("nan"), float("inf"), True, "1", 4.5])
def test_impossible_cpu_quotas_are_config_errors(fake: FakeCgroup2, cores: object) -> None:
    t = _throttle(fake)
    with pytest.raises(ConfigError, match="cpu_quota_cores"):
        t.create("d", cpu_quota_cores=cores, mem_limit_mb=None)  # type: ignore[arg-type]
    assert not (fake.root / PREFIX).exists()  # validated before any mkdir


def test_quota_above_host_cores_names_value_and_cores(fake: FakeCgroup2) -> None:
    group = _throttle(fake).create("d", cpu_quota_cores=1, mem_limit_mb=None)
    with pytest.raises(ConfigError, match=r"cpu_quota_cores=4\.5 exceeds the 4 cores"):
        group.set_cpu_quota(4.5)
    assert fake.text(f"{PREFIX}/run1/d/cpu.max") == "10000 10000"  # unchanged


@pytest.mark.parametrize("mb", [0, 7, -64, 64.0, True])
def test_bad_memory_limits_are_config_errors(fake: FakeCgroup2, mb: object) -> None:
    with pytest.raises(ConfigError, match="mem_limit_mb"):
        _throttle(fake).create("d", cpu_quota_cores=None, mem_limit_mb=mb)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "../etc", "a b", "cpu.max", "-x", "x" * 65])
def test_bad_names_are_config_errors(fake: FakeCgroup2, name: str) -> None:
    with pytest.raises(ConfigError, match="cgroup name"):
        _throttle(fake).create(name, cpu_quota_cores=None, mem_limit_mb=None)


def test_a_bad_run_id_is_an_error_not_a_silent_fall_back_to_no_throttling(fake: FakeCgroup2) -> None:
    # A sweep variant named "s0.95" once made the run id invalid, and the campaign ran unthrottled.
    with pytest.raises(ConfigError, match=re.escape("run id 'zerofl-s0.95-abc123'")):
        detect_throttle(str(fake.root), PREFIX, run_id="zerofl-s0.95-abc123", host_cores=4, fs=fake)


@pytest.mark.parametrize(("name", "expected"), [
    ("compare-zerofl-s0.95", "compare-zerofl-s0-95-abc123"),
    ("_odd name", "odd-name-abc123"),
    ("x" * 80, "x" * 57 + "-abc123"),
    ("...", "run-abc123"),
])
def test_run_ids_from_campaign_names_are_valid_cgroup_names(fake: FakeCgroup2, name: str, expected: str) -> None:
    run_id = run_id_for(name, "abc123")
    assert run_id == expected
    t = detect_throttle(str(fake.root), PREFIX, run_id=run_id, host_cores=4, fs=fake)
    assert isinstance(t, cgroup_backends.V2Throttle)
    t.close()


def test_duplicate_device_name_is_refused(fake: FakeCgroup2) -> None:
    t = _throttle(fake)
    t.create("d", cpu_quota_cores=None, mem_limit_mb=None)
    with pytest.raises(OrchardError, match="already exists"):
        t.create("d", cpu_quota_cores=None, mem_limit_mb=None)


def test_stats_parse_the_groups_own_counters(fake: FakeCgroup2) -> None:
    group = _throttle(fake).create("d", cpu_quota_cores=0.5, mem_limit_mb=64)
    group.add_pid(4242)
    rel = f"{PREFIX}/run1/d"
    fake.set_counters(f"{rel}/cpu.stat", usage_usec=1_500_000, user_usec=1_400_000, system_usec=100_000,
                      nr_periods=20, nr_throttled=7, throttled_usec=300_000, nr_bursts=0, burst_usec=0)
    (fake.root / rel / "memory.current").write_text(f"{48 * MIB}\n")
    (fake.root / rel / "memory.peak").write_text(f"{63 * MIB}\n")
    fake.set_counters(f"{rel}/memory.events", low=0, high=0, max=5, oom=2, oom_kill=2, oom_group_kill=0)
    s = group.stats()
    assert (s.cpu_usage_s, s.nr_periods, s.nr_throttled, s.throttled_s) == (1.5, 20, 7, 0.3)
    assert (s.mem_current_mb, s.mem_peak_mb, s.mem_limit_hits, s.oom_kills) == (48, 63, 5, 2)
    assert group.oom_kills() == 2  # the runner's per-loop read: memory.events alone
    assert (s.frozen, s.pids) == (False, (4242,))


def test_peak_falls_back_to_sampled_max_and_old_kernels_report_no_oom_counter(tmp_path: Path) -> None:
    fs = FakeCgroup2(tmp_path / "cg", memory_peak=False)
    try:
        group = _throttle(fs).create("d", cpu_quota_cores=None, mem_limit_mb=None)
        rel = f"{PREFIX}/run1/d"
        fs.set_counters(f"{rel}/memory.events", low=0, high=0, max=0, oom=0)  # pre-4.13: no oom_kill line
        (fs.root / rel / "memory.current").write_text(f"{10 * MIB}\n")
        assert group.stats().mem_peak_mb == 10
        (fs.root / rel / "memory.current").write_text(f"{5 * MIB}\n")
        s = group.stats()
        assert (s.mem_current_mb, s.mem_peak_mb, s.oom_kills) == (5, 10, None)
        assert group.oom_kills() is None
    finally:
        cleanup_all(PREFIX, str(fs.root), fs=fs)


def test_freeze_waits_for_cgroup_events(fake: FakeCgroup2) -> None:
    fake.freeze_lag_reads = 3
    group = _throttle(fake).create("d", cpu_quota_cores=None, mem_limit_mb=None)
    group.freeze()
    assert fake.text(f"{PREFIX}/run1/d/cgroup.freeze") == "1"
    assert "frozen 1" in fake.text(f"{PREFIX}/run1/d/cgroup.events")
    assert group.stats().frozen
    group.thaw()
    assert not group.stats().frozen


def test_freeze_that_never_completes_raises_naming_the_group(fake: FakeCgroup2,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup_backends, "FREEZE_TIMEOUT_S", 0.05)
    fake.freeze_never_completes = True
    group = _throttle(fake).create("stuck", cpu_quota_cores=None, mem_limit_mb=None)
    with pytest.raises(OrchardError, match=r"stuck at .*did not become frozen"):
        group.freeze()


def test_destroy_thaws_then_kills_then_removes_empty_parents(fake: FakeCgroup2) -> None:
    t = _throttle(fake)
    a = t.create("a", cpu_quota_cores=None, mem_limit_mb=None)
    b = t.create("b", cpu_quota_cores=None, mem_limit_mb=None)
    a.add_pid(101)
    a.add_pid(102)
    a.freeze()
    a.destroy()
    ops = [(op, path, value) for op, path, value in fake.log if path.startswith(f"{PREFIX}/run1/a")]
    thaw = ops.index(("write", f"{PREFIX}/run1/a/cgroup.freeze", "0"))
    kill = ops.index(("write", f"{PREFIX}/run1/a/cgroup.kill", "1"))
    assert thaw < kill < ops.index(("rmdir", f"{PREFIX}/run1/a", ""))
    assert sorted(fake.signalled) == [101, 102]
    assert not (fake.root / PREFIX / "run1" / "a").exists()
    assert (fake.root / PREFIX / "run1").exists()  # b still lives there
    a.destroy()  # idempotent
    with pytest.raises(OrchardError, match="already destroyed"):
        a.stats()
    b.destroy()
    assert not (fake.root / PREFIX).exists()
    assert (fake.root / "cgroup.procs").exists()  # the hierarchy root itself is never touched
    assert not [g for g in registered_groups() if g.place.root == str(fake.root)]


def test_destroy_without_cgroup_kill_signals_each_pid(tmp_path: Path) -> None:
    fs = FakeCgroup2(tmp_path / "cg", cgroup_kill=False)
    group = _throttle(fs).create("d", cpu_quota_cores=None, mem_limit_mb=None)
    group.add_pid(7)
    group.destroy()
    assert ("kill", f"{PREFIX}/run1/d", "7") in fs.log
    assert not (fs.root / PREFIX).exists()


def test_destroy_never_kills_the_harness_itself(fake: FakeCgroup2) -> None:
    group = _throttle(fake).create("d", cpu_quota_cores=None, mem_limit_mb=None)
    group.add_pid(os.getpid())
    fake.cgroup_kill = False
    os.remove(fake.root / PREFIX / "run1" / "d" / "cgroup.kill")
    group.destroy()
    assert os.getpid() not in fake.signalled
    assert os.getpid() in fake.procs(fake.root)  # moved back to the hierarchy root instead


def test_cleanup_all_removes_registered_groups_and_leftovers_of_a_crashed_run(fake: FakeCgroup2) -> None:
    _throttle(fake).create("live", cpu_quota_cores=0.5, mem_limit_mb=64)
    for d in (f"{PREFIX}/old-run", f"{PREFIX}/old-run/dev"):  # as another process left them
        fake.mkdir(str(fake.root / d))
    fake.write(str(fake.root / PREFIX / "old-run" / "dev" / "cgroup.procs"), "555")
    fake.write(str(fake.root / PREFIX / "old-run" / "dev" / "cgroup.freeze"), "1")
    removed = cleanup_all(PREFIX, str(fake.root), fs=fake)
    assert str(fake.root / PREFIX / "old-run" / "dev") in removed
    assert str(fake.root / PREFIX / "run1" / "live") in removed
    assert 555 in fake.signalled
    assert not (fake.root / PREFIX).exists()
    assert cleanup_all(PREFIX, str(fake.root), fs=fake) == []  # idempotent


def test_missing_memory_controller_warns_and_refuses_memory_caps(tmp_path: Path) -> None:
    fs = FakeCgroup2(tmp_path / "cg", controllers=("cpuset", "cpu", "pids"))
    try:
        t = _throttle(fs)
        assert t.warning is not None and "memory" in t.warning
        group = t.create("d", cpu_quota_cores=0.5, mem_limit_mb=None)
        assert isinstance(group, V2Group)
        with pytest.raises(OrchardError, match=r"memory\.max"):
            group.set_mem_limit(64)
    finally:
        cleanup_all(PREFIX, str(fs.root), fs=fs)


def test_unwritable_cgroups_fall_back_to_none_or_raise_naming_the_path(fake: FakeCgroup2) -> None:
    fake.deny_mkdir = True
    t = detect_throttle(str(fake.root), PREFIX, fs=fake)
    assert t.backend == "none"
    assert t.warning is not None and "THROTTLING DISABLED" in t.warning and str(fake.root / PREFIX) in t.warning
    with pytest.raises(OrchardError, match=f"{fake.root / PREFIX}.*Permission denied"):
        detect_throttle(str(fake.root), PREFIX, fs=fake, required=True)


def test_no_cgroupfs_at_all_gives_none_with_a_loud_warning(tmp_path: Path) -> None:
    t = detect_throttle(str(tmp_path), PREFIX)
    assert isinstance(t, NullThrottle)
    assert t.warning is not None and "THROTTLING DISABLED" in t.warning and str(tmp_path) in t.warning
    with pytest.raises(ConfigError):
        t.create("d", cpu_quota_cores=-1, mem_limit_mb=None)  # same validation as the real backends


def test_null_group_destroy_kills_its_own_processes_only() -> None:
    t = detect_throttle("/nonexistent-cgroup-root", PREFIX)
    group = t.create("d", cpu_quota_cores=0.5, mem_limit_mb=64)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        group.add_pid(child.pid)
        group.freeze()  # no-op
        assert group.stats().pids == (child.pid,)
        t.close()
        assert child.wait(timeout=5) == -9
    finally:
        child.kill()
        child.wait()
