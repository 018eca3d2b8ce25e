"""Host calibration: the reference chain, board quota math, fleet capacity, and the host-speed
cache keyed by fingerprint (with a fake measurement; one real probe with a few steps)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from runtime.board import load_board
from runtime.errors import ConfigError
from runtime.telemetry import threads_for_quota
from testbed import calibrate
from testbed.calibrate import (
    REFERENCE_STEP_MS_AT_SPEED_1,
    SPEED_1_FP32_GFLOPS,
    HostSpeed,
    board_quota_cores,
    derive_reference_step_ms,
    get_host_speed,
    measure_host_speed,
    reference_step_flops,
)


def host(speed: float = 4.0, step_ms: float | None = None, gemm: float | None = None) -> HostSpeed:
    step = REFERENCE_STEP_MS_AT_SPEED_1 / speed if step_ms is None else step_ms
    # A GEMM rate that gives the build host's efficiency, unless told otherwise.
    flops = reference_step_flops()
    g = flops / (step * 1e-3) / calibrate.BUILD_HOST_EFFICIENCY / 1e9 if gemm is None else gemm
    return HostSpeed(speed, step, g, "2026-01-01T00:00:00Z", "test host")


# --------------------------------------------------------------------------- reference chain
def test_reference_step_time_follows_from_the_recorded_measurement() -> None:
    flops = reference_step_flops(12_944_640, 32)
    assert flops == pytest.approx(1.2427e9, rel=1e-4)
    derived = derive_reference_step_ms(flops, calibrate.BUILD_HOST_STEP_MS, calibrate.BUILD_HOST_GEMM_GFLOPS)
    assert pytest.approx(derived, abs=0.05) == REFERENCE_STEP_MS_AT_SPEED_1
    assert 60 < REFERENCE_STEP_MS_AT_SPEED_1 < 130
    # The efficiency cancels on the measuring host: speed there = its GEMM rate / speed 1.0's.
    speed_on_build_host = REFERENCE_STEP_MS_AT_SPEED_1 / calibrate.BUILD_HOST_STEP_MS
    assert speed_on_build_host == pytest.approx(calibrate.BUILD_HOST_GEMM_GFLOPS / SPEED_1_FP32_GFLOPS, rel=2e-3)
    assert 0.3 < calibrate.BUILD_HOST_EFFICIENCY < 0.7


def test_host_speed_efficiency_and_round_trip() -> None:
    h = host(4.0)
    assert h.efficiency == pytest.approx(calibrate.BUILD_HOST_EFFICIENCY)
    assert HostSpeed.from_dict(json.loads(json.dumps(h.__dict__))) == h
    assert host(4.0, gemm=0.0).efficiency == 0.0


# ------------------------------------------------------------------------------ board math
def test_board_quota_formula() -> None:
    rpi4, rpi5, agx = load_board("rpi4b-4gb"), load_board("rpi5"), load_board("jetson-agx-orin")
    assert board_quota_cores(rpi4, host(4.0)) == pytest.approx(4 * 0.24 / 4.0)
    assert board_quota_cores(rpi5, 2.0) == pytest.approx(4 * 0.68 / 2.0)
    # A board core faster than the host's gets whole host cores: the host cannot go faster.
    assert board_quota_cores(rpi4, 0.1) == 4.0
    assert board_quota_cores(agx, 0.5) == 12.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="host speed"):
            board_quota_cores(rpi4, bad)
    assert rpi4.memory_cap_mb == 4096 - 512


def test_trainer_threads_round_quota_up_to_the_boards_cores() -> None:
    assert threads_for_quota(0.2) == 1
    assert threads_for_quota(1.77) == 2  # an Orin NX at 1.77 cores uses both
    assert threads_for_quota(2.0) == 2 and threads_for_quota(2.0 + 1e-9) == 2
    assert threads_for_quota(3.5, board_cores=2) == 2  # never more threads than the board has cores
    assert threads_for_quota(None, board_cores=6) == 6


# ------------------------------------------------------------------------------------ cache
class FakeMeasure:
    def __init__(self, *speeds: HostSpeed) -> None:
        self.speeds = list(speeds)
        self.calls = 0

    def __call__(self) -> HostSpeed:
        self.calls += 1
        return self.speeds.pop(0)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv(calibrate.ENV_HOST_SPEED, raising=False)
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "host_speed.json"


def test_cache_is_used_while_the_fingerprint_matches(no_env: Path) -> None:
    measure = FakeMeasure(host(3.0), host(5.0))
    first = get_host_speed(measure=measure)
    assert first.speed_factor == 3.0 and measure.calls == 1 and first.source == "measured"
    assert no_env.exists()  # $ORCHARD_CACHE/host_speed.json
    cached = get_host_speed(measure=measure)
    assert cached.speed_factor == first.speed_factor and cached.source == "cache" and measure.calls == 1
    assert get_host_speed(force=True, measure=measure).speed_factor == 5.0 and measure.calls == 2
    assert get_host_speed(measure=measure).speed_factor == 5.0


def test_stale_fingerprint_triggers_a_new_measurement(no_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measure = FakeMeasure(host(3.0), host(6.0))
    get_host_speed(measure=measure)
    real = calibrate.host_fingerprint()
    monkeypatch.setattr(calibrate, "host_fingerprint", lambda: {**real, "kernel": "9.9.9-new"})
    assert get_host_speed(measure=measure).speed_factor == 6.0 and measure.calls == 2
    hosts = json.loads(no_env.read_text())["hosts"]
    assert len(hosts) == 2  # both hosts kept: a shared home directory serves several machines
    assert {e["fingerprint"]["kernel"] for e in hosts.values()} == {real["kernel"], "9.9.9-new"}
    monkeypatch.setattr(calibrate, "host_fingerprint", lambda: real)
    assert get_host_speed(measure=measure).speed_factor == 3.0 and measure.calls == 2


def test_corrupt_cache_is_measured_again(no_env: Path) -> None:
    no_env.parent.mkdir(parents=True)
    no_env.write_text("{not json")
    measure = FakeMeasure(host(2.5))
    assert get_host_speed(measure=measure).speed_factor == 2.5
    assert json.loads(no_env.read_text())["version"] == 1


def test_explicit_cache_path_and_env_override(no_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "elsewhere.json"
    get_host_speed(cache_path=path, measure=FakeMeasure(host(3.5)))
    assert path.exists() and not no_env.exists()
    monkeypatch.setenv(calibrate.ENV_HOST_SPEED, "2.0")
    forced = get_host_speed(measure=FakeMeasure())
    assert forced.speed_factor == 2.0 and forced.source == "env"
    assert forced.ref_step_ms == pytest.approx(REFERENCE_STEP_MS_AT_SPEED_1 / 2.0)
    # A campaign's [throttle] host_speed wins over the environment.
    pinned = get_host_speed(pinned=3.25, measure=FakeMeasure())
    assert pinned.speed_factor == 3.25 and pinned.source == "campaign"
    with pytest.raises(ConfigError, match="host speed factor"):
        get_host_speed(pinned=0.0)
    monkeypatch.setenv(calibrate.ENV_HOST_SPEED, "fast")
    with pytest.raises(ConfigError, match="ORCHARD_HOST_SPEED"):
        get_host_speed()


def test_a_busy_measurement_is_used_but_not_cached(no_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    slow = host(2.0, gemm=host(4.0).gemm_gflops)  # the step took twice as long as the GEMM implies
    measure = FakeMeasure(slow, host(4.0))
    with caplog.at_level(logging.WARNING, logger="testbed.calibrate"):
        assert get_host_speed(measure=measure).speed_factor == 2.0
    assert "looks busy" in caplog.text and not no_env.exists()
    assert get_host_speed(measure=measure).speed_factor == 4.0 and measure.calls == 2
    assert get_host_speed(measure=measure).speed_factor == 4.0 and measure.calls == 2


def test_fingerprint_names_the_host() -> None:
    fp = calibrate.host_fingerprint()
    assert set(fp) >= {"cpu_model", "cores", "kernel", "onnxruntime", "calibration"}
    assert fp["cores"] >= 1 and fp["cpu_model"]


# ------------------------------------------------------------------------------ real probe
@pytest.mark.slow
def test_measure_host_speed_runs_a_real_probe(artifact_cache: Path) -> None:
    h = measure_host_speed(steps=3, rounds=1, warmup=1, gemm_reps=2, cache_dir=artifact_cache)
    assert h.ref_step_ms > 0 and h.gemm_gflops > 0
    assert h.speed_factor == pytest.approx(REFERENCE_STEP_MS_AT_SPEED_1 / h.ref_step_ms)
    assert h.source == "measured"
    assert "onnxruntime" in h.host and h.efficiency > 0


def test_reference_flops_constant_matches_the_manifest(artifact_cache: Path) -> None:
    from runtime.manifest import read_manifest

    manifest = read_manifest(calibrate.reference_artifact(artifact_cache))
    assert manifest.flops_per_sample == calibrate.REFERENCE_FLOPS_PER_SAMPLE
    assert manifest.input_shape == calibrate.REFERENCE_INPUT_SHAPE
    from testbed import step_probe

    assert step_probe.BATCH == calibrate.REFERENCE_BATCH


def test_probe_failure_names_the_exit_code(tmp_path: Path) -> None:
    from runtime.errors import OrchardError

    with pytest.raises(OrchardError, match="probe exited 1"):
        calibrate.run_probe(tmp_path / "no-artifact", steps=1, warmup=1, gemm_reps=0)
