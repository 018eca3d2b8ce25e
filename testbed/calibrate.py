"""Host speed calibration and board emulation math.

A board is emulated by a CPU quota `cores x min(1, speed_board / speed_host)` and a memory cap
(`board.memory_cap_mb`). Board speeds are in firmware_configs/README.md's unit: 1.0 = one Intel
N100 core in an all-core run = 12.5 GFLOPS fp64 HPL per core, taken as 25 GFLOPS fp32 GEMM
(fp32 has twice the SIMD lanes; platform.md 1.3). The host has to be put in the same unit, and
no N100 is at hand, so the reference time is derived, not measured:

  reference step   one SGD training step of the VGG-style "cnn" at width 0.5 on 3x32x32, batch
                   32, 10 classes, one ORT thread. FLOPs = 3 x forward FLOPs (manifest) x batch
                   = 3 x 12.94 MFLOP x 32 = 1.243 GFLOP (backward ~ 2x forward).
  efficiency       achieved FLOP/s of that step / the same core's np.dot 1024x1024 float32
                   FLOP/s (single-threaded OpenBLAS). MEASURED on the build host (AMD EPYC
                   Zen 5, KVM, ORT 1.19.2, OpenBLAS 0.3.23): step 22.8 ms = 54.6 GFLOP/s, np.dot
                   112 GFLOP/s, efficiency 0.49, with the generated graphs of builder 1. Builder 3
                   replaces ORT's slow ReluGrad (models/grad_rewrite.py): the same step took
                   0.790x the CPU in an interleaved A/B on the same host (16.10 against 20.39
                   ms), so 17.97 ms = 69.1 GFLOP/s, efficiency 0.61. Builder 5 pools without
                   indices and takes conv input gradients from a forward Conv: 0.931x the CPU
                   in an interleaved A/B on the same host (15.66 against 16.83 ms; bench/
                   trainer_ab.py, 3 runs, load 8.6), so 16.73 ms = 74.3 GFLOP/s, efficiency
                   0.66. Small training GEMMs, im2col and the elementwise ops keep ORT well
                   below what a large GEMM reaches.
  speed 1.0 time   REFERENCE_STEP_MS_AT_SPEED_1 = 1.243 GFLOP / (25 GFLOP/s x 0.66) = 75 ms.
  host speed       speed_host = REFERENCE_STEP_MS_AT_SPEED_1 / (this host's reference step ms).

On the build host this is, by construction, np.dot GFLOP/s / 25 (the ORT step cancels out). On
any other host the measured ORT step carries the information, with the efficiency assumed to
carry over. Uncertainty, largest first: (1) 25 GFLOPS comes from an all-core HPL run on a 6 W
part; a single N100 core running np.dot alone would likely reach 35-50 (peak 54 at 3.4 GHz), so
if the boards' HPL-derived factors are read as "per-core GEMM" the host is overstated by up to
~2x and emulated boards run slow by the same factor; (2) the efficiency of small GEMMs on an
N100 (or on a board) need not be this host's 0.61 (caches, SIMD width: AVX-512 here, AVX2 /
NEON there), easily +-30%; (3) run-to-run noise on a shared host, ~5-10%. Replace the constant
with a real N100 (or board) step time as soon as one has run `python -m testbed.calibrate`.

The host's step is timed in process CPU time (user + system of the probe, all its threads), not
wall time: wall time grows with whatever else the host runs, CPU time only with the work itself
(measured here: wall-time speeds of 1.33-4.49 on one machine, depending on its load). The
fastest of several rounds counts, as cache pollution from neighbours can only add to it.

Measured once per host and cached in `$ORCHARD_CACHE/host_speed.json` (default
`~/.cache/orchard/`), keyed by a fingerprint (CPU model, core count, kernel, ORT version,
calibration version). A campaign's `[throttle] host_speed = <factor>` pins it, else
`ORCHARD_HOST_SPEED=<factor>` (CI, tests); `HostSpeed.source` records which one was used.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.board import BoardConfig
from runtime.errors import ConfigError, OrchardError
from runtime.ort import onnxruntime_version
from runtime.telemetry import threads_for_quota

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_VERSION = 4  # bump when the reference workload or its timing changes: cached speeds are then stale
REFERENCE_MODEL, REFERENCE_WIDTH, REFERENCE_INPUT_SHAPE, REFERENCE_CLASSES = "cnn", 0.5, (3, 32, 32), 10
REFERENCE_BATCH = 32
SPEED_1_FP32_GFLOPS = 25.0  # firmware_configs/README.md: 12.5 fp64 HPL per N100 core x 2
# The build host's measurement behind the constant below (see the module docstring).
BUILD_HOST_STEP_MS = 16.73  # 22.76 x 0.790 (builder 1 -> 3) x 0.931 (3 -> 5, see above)
BUILD_HOST_GEMM_GFLOPS = 112.6
REFERENCE_FLOPS_PER_SAMPLE = 12_944_640  # forward FLOPs of the reference model (its manifest)
ENV_HOST_SPEED = "ORCHARD_HOST_SPEED"
_SINGLE_THREAD_ENV = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def reference_step_flops(flops_per_sample: int = REFERENCE_FLOPS_PER_SAMPLE, batch: int = REFERENCE_BATCH) -> float:
    """FLOPs of one training step: forward + backward (~2x forward), per sample, times the batch."""
    return 3.0 * flops_per_sample * batch


def step_efficiency(step_flops: float, step_ms: float, gemm_gflops: float) -> float:
    """FLOP rate a training step achieves, as a fraction of the same core's large-GEMM rate."""
    return step_flops / (step_ms * 1e-3) / (gemm_gflops * 1e9)


def derive_reference_step_ms(step_flops: float, host_step_ms: float, host_gemm_gflops: float,
                             speed_1_gflops: float = SPEED_1_FP32_GFLOPS) -> float:
    """Step time at speed 1.0: the step's FLOPs at speed 1.0's GEMM rate, derated by the
    efficiency a host achieves on the step relative to its own large GEMM."""
    efficiency = step_efficiency(step_flops, host_step_ms, host_gemm_gflops)
    return step_flops / (speed_1_gflops * 1e9 * efficiency) * 1e3


BUILD_HOST_EFFICIENCY = step_efficiency(reference_step_flops(), BUILD_HOST_STEP_MS, BUILD_HOST_GEMM_GFLOPS)
# Below this share of the build host's efficiency, suspect other load and do not cache. 0.6, not
# 0.8: in CPU time a busy core barely moves the step (busy/idle 0.986-0.989), but this shared VM's
# step drifts against its GEMM with no local load: 0.74-0.79 at load 0.6 on 2026-12-01, so at 0.8
# a quiet host was never cached and each campaign re-measured its quotas.
BUSY_EFFICIENCY_RATIO = 0.6
REFERENCE_STEP_MS_AT_SPEED_1 = round(
    derive_reference_step_ms(reference_step_flops(), BUILD_HOST_STEP_MS, BUILD_HOST_GEMM_GFLOPS), 1)


@dataclass(frozen=True)
class HostSpeed:
    speed_factor: float  # this host's core in the boards' unit (1.0 = one N100 core)
    ref_step_ms: float  # reference step on one thread, CPU time (fastest round)
    gemm_gflops: float  # single-thread np.dot 1024x1024 float32, best of the repeats
    measured_at: str  # ISO 8601 UTC, or "pinned" when set by the campaign or ORCHARD_HOST_SPEED
    host: str  # CPU model, cores, kernel, ORT version: for reports
    source: str = "measured"  # measured | cache | env (ORCHARD_HOST_SPEED) | campaign ([throttle] host_speed)

    @property
    def efficiency(self) -> float:
        """Reference step FLOP/s over the GEMM's (0.0 when the GEMM was not measured)."""
        if self.gemm_gflops <= 0:
            return 0.0
        return step_efficiency(reference_step_flops(), self.ref_step_ms, self.gemm_gflops)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostSpeed:
        return cls(float(data["speed_factor"]), float(data["ref_step_ms"]), float(data["gemm_gflops"]),
                   str(data["measured_at"]), str(data["host"]), str(data.get("source", "measured")))


@dataclass(frozen=True)
class ProbeResult:
    """What one reference-step probe process reports."""

    step_ms_median: float  # the lowest of the rounds' medians: other load only ever slows a step
    step_ms_mean: float  # wall time of all timed steps / steps: the throughput a quota delivers
    gemm_gflops: float  # 0.0 when the GEMM was not run
    flops_per_sample: int
    threads: int
    cpu_ms_per_step: float  # CPU time of the timed steps (all threads) / steps
    cpu_ms_per_step_best: float  # the same, of the round that needed the least CPU time


# ------------------------------------------------------------------------- board emulation
def _speed(host_speed: HostSpeed | float) -> float:
    s = host_speed.speed_factor if isinstance(host_speed, HostSpeed) else float(host_speed)
    if not (s > 0 and math.isfinite(s)):
        raise ConfigError(f"host speed factor {s!r} must be a positive number")
    return s


def board_quota_cores(board: BoardConfig, host_speed: HostSpeed | float) -> float:
    """CPU quota, in host cores, that makes this host deliver the board's compute:
    cores x min(1, speed_board / speed_host). A board faster per core than the host gets whole
    cores (the host cannot go faster). Quotas below the kernel's floor (1 ms per period, the
    period at most 1 s: 0.001 core, testbed.cgroups.cpu_period_us stretches the period for small
    quotas) are raised to it by the throttle, so such a board would run fast."""
    return board.cores * min(1.0, board.speed_factor / _speed(host_speed))


# ------------------------------------------------------------------------------- measuring
def reference_artifact(cache_dir: Path | None = None) -> Path:
    """The reference model's training artifacts (generated once, cached by structure)."""
    from models.artifacts import artifacts_for
    from runtime.profile import Profile

    profile = Profile(width=REFERENCE_WIDTH).canonical()
    sets = artifacts_for(REFERENCE_MODEL, REFERENCE_INPUT_SHAPE, REFERENCE_CLASSES, [profile], cache_dir=cache_dir)
    return sets[profile].directory


def _probe_command(artifact: Path, threads: int, steps: int, warmup: int, gemm_reps: int,
                   pin: bool, wait: bool, rounds: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "testbed.step_probe", "--artifact", str(artifact), "--threads",
           str(threads), "--steps", str(steps), "--warmup", str(warmup), "--gemm-reps", str(gemm_reps),
           "--rounds", str(rounds)]
    return cmd + (["--pin"] if pin else []) + (["--wait"] if wait else [])


def _probe_env(threads: int) -> dict[str, str]:
    env = {**os.environ, **{k: str(threads) for k in _SINGLE_THREAD_ENV}}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _parse_probe(out: str, err: str, code: int | None, what: str) -> ProbeResult:
    lines = out.strip().splitlines()
    if code != 0 or not lines:
        tail = " | ".join(err.strip().splitlines()[-3:])
        hint = " (killed: out of memory under the cap?)" if code in (137, -9) else ""
        raise OrchardError(f"{what}: reference-step probe exited {code}{hint}: {tail}")
    data = json.loads(lines[-1])
    return ProbeResult(**{f.name: data[f.name] for f in dataclasses.fields(ProbeResult)})


def run_probe(artifact: Path, *, threads: int = 1, steps: int = 30, warmup: int = 5, gemm_reps: int = 10,
              rounds: int = 1, pin: bool = False, timeout_s: float = 600.0) -> ProbeResult:
    """Time the reference step (and a GEMM) in a fresh process: nothing else of ours is loaded
    in it, and its BLAS/OpenMP pools are sized to `threads` before numpy starts. With several
    `rounds` of `steps`, the fastest round's median counts: on a shared host other work only
    ever slows a round down. Not pinned by default: on a busy host a pinned probe cannot move
    off a loaded core."""
    proc = subprocess.run(_probe_command(artifact, threads, steps, warmup, gemm_reps, pin, False, rounds),
                          capture_output=True, text=True, env=_probe_env(threads), timeout=timeout_s, check=False)
    return _parse_probe(proc.stdout, proc.stderr, proc.returncode, "host speed")


def host_fingerprint() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                model = value.strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count() or 1, "kernel": platform.release(),
            "machine": platform.machine(), "onnxruntime": onnxruntime_version(), "calibration": CALIBRATION_VERSION}


def _describe(fp: Mapping[str, Any]) -> str:
    return f"{fp['cpu_model']}, {fp['cores']} cores, Linux {fp['kernel']}, onnxruntime {fp['onnxruntime']}"


def measure_host_speed(*, steps: int = 20, rounds: int = 5, warmup: int = 5, gemm_reps: int = 20,
                       cache_dir: Path | None = None, timeout_s: float = 600.0) -> HostSpeed:
    """Measure this host in the boards' unit: the reference step on one thread in CPU time (the
    round of `steps` steps, after `warmup`, that needed the least), in a fresh process."""
    probe = run_probe(reference_artifact(cache_dir), threads=1, steps=steps, warmup=warmup,
                      gemm_reps=gemm_reps, rounds=rounds, timeout_s=timeout_s)
    if probe.flops_per_sample != REFERENCE_FLOPS_PER_SAMPLE:  # the builder changed the model
        raise OrchardError(f"the reference model now has {probe.flops_per_sample} FLOPs per sample, not "
                           f"{REFERENCE_FLOPS_PER_SAMPLE}: re-derive REFERENCE_STEP_MS_AT_SPEED_1 and bump "
                           "CALIBRATION_VERSION in testbed/calibrate.py")
    return HostSpeed(speed_factor=REFERENCE_STEP_MS_AT_SPEED_1 / probe.cpu_ms_per_step_best,
                     ref_step_ms=probe.cpu_ms_per_step_best, gemm_gflops=probe.gemm_gflops,
                     measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     host=_describe(host_fingerprint()))


def host_speed_cache_path() -> Path:
    env = os.environ.get("ORCHARD_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "orchard") / "host_speed.json"


def _fingerprint_key(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def get_host_speed(force: bool = False, *, pinned: float | None = None, cache_path: Path | None = None,
                   measure: Callable[[], HostSpeed] | None = None) -> HostSpeed:
    """This host's speed: `pinned` (a campaign's [throttle] host_speed) if given, else
    `$ORCHARD_HOST_SPEED` if set, else the cached measurement if its fingerprint matches this
    host, else a fresh measurement (stored for next time)."""
    fp = host_fingerprint()
    if pinned is not None:
        factor = _speed(pinned)
        return HostSpeed(factor, REFERENCE_STEP_MS_AT_SPEED_1 / factor, 0.0, "pinned", _describe(fp), "campaign")
    override = os.environ.get(ENV_HOST_SPEED)
    if override and not force:
        try:
            factor = _speed(float(override))
        except (ValueError, ConfigError):
            raise ConfigError(f"{ENV_HOST_SPEED}={override!r} is not a positive number") from None
        return HostSpeed(factor, REFERENCE_STEP_MS_AT_SPEED_1 / factor, 0.0, "pinned", _describe(fp), "env")
    path = cache_path or host_speed_cache_path()
    key = _fingerprint_key(fp)
    try:
        hosts = json.loads(path.read_text()).get("hosts", {})
        if not isinstance(hosts, dict):
            hosts = {}
    except (OSError, ValueError, AttributeError):
        hosts = {}  # no cache yet, or an unreadable one: measure and rewrite it
    entry = hosts.get(key)
    if not force and isinstance(entry, dict) and entry.get("fingerprint") == fp:
        try:
            return dataclasses.replace(HostSpeed.from_dict(entry["host_speed"]), source="cache")
        except (KeyError, TypeError, ValueError):
            pass
    speed = (measure or measure_host_speed)()
    if 0 < speed.efficiency < BUSY_EFFICIENCY_RATIO * BUILD_HOST_EFFICIENCY:
        # The GEMM (best of many short runs) shrugs off other load; the step median does not.
        # So a low ratio most likely means a busy host: use the figure, but do not keep it.
        log.warning("host speed %.2f measured with the reference step at %.2f of the GEMM's FLOP rate "
                    "(%.2f when idle on the build host): the host looks busy, so the value is not cached; "
                    "run `python -m testbed.calibrate --force` on an idle host", speed.speed_factor,
                    speed.efficiency, BUILD_HOST_EFFICIENCY)
        return speed
    hosts[key] = {"fingerprint": fp, "host_speed": {**dataclasses.asdict(speed), "source": "measured"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".host_speed-", delete=False) as f:
        json.dump({"version": 1, "hosts": hosts}, f, indent=1, sort_keys=True)
    os.replace(f.name, path)  # atomic: a concurrent reader sees the old file or the new one
    return speed


# ------------------------------------------------------------------------------ fidelity
def board_step_ms(board: BoardConfig) -> float:
    """The reference step on the board itself, by its speed factor, with its cores working in
    parallel (the emulation's model: a quota of `cores x speed_board / speed_host` host cores)."""
    return REFERENCE_STEP_MS_AT_SPEED_1 / (board.speed_factor * board.cores)


@dataclass(frozen=True)
class EmulatedStep:
    """The reference step inside a board's cgroup, next to what the quota should give."""

    board: str
    quota_cores: float
    threads: int
    step_ms_median: float
    step_ms_mean: float  # wall / steps; the figure to judge a quota by (see emulate_reference_step)
    host_step_ms: float  # same threads, no quota, measured just before (fastest of 3 rounds)
    target_ms: float  # the board's step by its speed factor: REFERENCE_STEP_MS_AT_SPEED_1 / (speed x cores)
    board_core_ms: float  # REFERENCE_STEP_MS_AT_SPEED_1 / speed: one board core, for context
    nr_throttled: int
    cpu_ms_per_step: float  # CPU time per step under the quota; above host_step_ms when each
    # period's burst starts cold (caches, and on a VM the vCPU's wake-up), which slows the board
    delivered_cores: float  # CPU time / wall time over the timed steps: what the quota really gave


def emulate_reference_step(board: BoardConfig, host_speed: HostSpeed | float, *, steps: int = 40,
                           warmup: int = 5, artifact: Path | None = None, throttle: Any = None,
                           pin: bool = False, timeout_s: float = 900.0) -> EmulatedStep:
    """Run the reference step in a real cgroup with the board's quota and memory cap.

    The probe loads and warms up unthrottled, then joins the group and times `steps` steps.
    A quota is per 100 ms CFS period, so a step shorter than a period runs in bursts: single
    steps take either a slice of a period or a whole extra one, and their median can sit far from
    the mean. Compare `step_ms_mean` to `target_ms`. `target_ms` assumes the board's cores
    scale perfectly, which is the emulation's model: its threads get min(quota, threads) cores.
    `pin` keeps the probe on one CPU (to tell quota stranding across CPUs from other losses).
    """
    from testbed.throttle import detect_throttle

    quota = board_quota_cores(board, host_speed)
    threads = threads_for_quota(quota, board.cores)
    artifact = artifact or reference_artifact()
    base = run_probe(artifact, threads=threads, steps=steps, warmup=warmup, gemm_reps=0, rounds=3)
    own = throttle is None
    throttle = throttle or detect_throttle(prefix="orchard-calibrate", required=True)
    group = throttle.create(f"fidelity-{board.name}", cpu_quota_cores=quota, mem_limit_mb=board.memory_cap_mb)
    try:
        proc = subprocess.Popen(_probe_command(artifact, threads, steps, warmup, 0, pin=pin, wait=True),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_probe_env(threads))
        assert proc.stdin is not None and proc.stdout is not None
        ready = proc.stdout.readline()  # the probe has loaded and warmed up
        if ready.strip() == "ready":
            group.add_pid(proc.pid)
            proc.stdin.write("go\n")
            proc.stdin.flush()
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except BaseException:
            proc.kill()  # it may not be in the group yet, where destroy() would find it
            proc.wait()
            raise
        result = _parse_probe(out, err, proc.returncode, f"board {board.name}")
        stats = group.stats()
    finally:
        group.destroy()
        if own:
            throttle.close()
    return EmulatedStep(
        board=board.name, quota_cores=quota, threads=threads, step_ms_median=result.step_ms_median,
        step_ms_mean=result.step_ms_mean, host_step_ms=base.step_ms_median,
        target_ms=board_step_ms(board), board_core_ms=REFERENCE_STEP_MS_AT_SPEED_1 / board.speed_factor,
        nr_throttled=stats.nr_throttled,
        cpu_ms_per_step=result.cpu_ms_per_step, delivered_cores=result.cpu_ms_per_step / result.step_ms_mean)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m testbed.calibrate", description="Measure (or show the cached) "
                                "speed of this host in the boards' unit (1.0 = one N100 core).")
    p.add_argument("--force", action="store_true", help="measure again even if a cached value matches")
    a = p.parse_args(args)
    speed = get_host_speed(force=a.force)
    print(json.dumps({**dataclasses.asdict(speed), "reference_step_ms_at_speed_1": REFERENCE_STEP_MS_AT_SPEED_1},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
