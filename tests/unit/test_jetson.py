"""Jetson: execution providers with a CPU fallback (one logged line), and GPU load, memory and
GPU-rail energy read from a fake sysfs tree in the real layout (an Orin Nano on JetPack 6). This
host has no GPU: the CUDA path is tested only for its fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime
import pytest

from models.artifacts import ensure_artifacts
from models.structure import full_structure
from runtime import ort
from runtime.board import load_board
from runtime.errors import ConfigError
from runtime.jetson_gpu import JetsonGpu
from runtime.ort import OrtSession, choose_device
from runtime.power_sensors import Ina3221HwmonSource
from runtime.telemetry import CgroupLimits, Sampler
from tests.unit.test_energy import ina3221_hwmon, put

CUDA, CPU, TRT = "CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"


def test_choose_device_takes_the_first_provider_the_build_has() -> None:
    assert choose_device([CUDA, CPU], [CUDA, CPU]) == ("cuda", None)
    device, why = choose_device([CUDA, CPU], [CPU])
    assert device == "cpu" and why == f"{CUDA} is not in this onnxruntime build (it has {CPU})"
    device, why = choose_device([TRT, CUDA, CPU], [TRT, CUDA, CPU])
    assert device == "cuda" and why is not None and "cannot train" in why
    assert choose_device([CPU], [CPU]) == ("cpu", None)


def test_a_cuda_board_on_a_cpu_build_trains_on_cpu_and_says_so_once(artifact_cache: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    directory = ensure_artifacts(full_structure("lenet", (1, 8, 8), 10), "sgd", artifact_cache).directory
    providers = load_board("jetson-orin-nano").runtime.execution_providers
    assert providers == (CUDA, CPU)
    ort._fallbacks_logged.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.ort"):
        sessions = [OrtSession(directory, threads=1, providers=providers) for _ in range(2)]
    assert [s.device for s in sessions] == ["cpu", "cpu"]
    lines = [r.getMessage() for r in caplog.records if r.name == "runtime.ort"]
    have = ", ".join(onnxruntime.get_available_providers())
    assert lines == [f"execution provider: {CUDA} is not in this onnxruntime build (it has {have}); training on CPU"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.ort"):
        OrtSession(directory, threads=1)  # a CPU-only board: nothing to say
    assert not caplog.records


def orin_nano_tree(root: Path, load_permille: int = 523, nvmap_kb: int = 204800) -> Path:
    """JetPack 6 Orin Nano: devfreq entry 17000000.gpu (a symlink into the platform device, whose
    of_node is named "gpu"), NvMapMemUsed in /proc/meminfo, INA3221 at 1-0040."""
    device = root / "sys/devices/platform/bus@0/17000000.gpu"
    put(device / "of_node/name", "gpu")
    put(device / "load", load_permille)
    put(device / "railgate_enable", 1)
    (device / "devfreq/17000000.gpu").mkdir(parents=True)
    (device / "devfreq/17000000.gpu/device").symlink_to("../..")
    put(device / "devfreq/17000000.gpu/cur_freq", 624750000)
    (root / "sys/class/devfreq").mkdir(parents=True)
    link = "../../devices/platform/bus@0/17000000.gpu/devfreq/17000000.gpu"
    (root / "sys/class/devfreq/17000000.gpu").symlink_to(link)
    # Another devfreq device (the memory controller's) that is not the GPU.
    put(root / "sys/devices/platform/emc/of_node/name", "external-memory-controller")
    put(root / "sys/devices/platform/emc/load", 999)
    (root / "sys/class/devfreq/emc").mkdir()
    (root / "sys/class/devfreq/emc/device").symlink_to("../../../devices/platform/emc")
    put(root / "proc/meminfo", f"MemTotal:        7620000 kB\nMemAvailable:    5000000 kB\n"
                               f"NvMapMemUsed:     {nvmap_kb} kB\nNvMapMemFree:      0 kB\n")
    ina3221_hwmon(root, "1-0040", "hwmon1", {1: ("VDD_IN", 5000, 1200), 2: ("VDD_CPU_GPU_CV", 5000, 400),
                                             3: ("VDD_SOC", 5000, 300)})
    return root


def test_gpu_load_memory_and_rail_energy_from_the_jetson_tree(tmp_path: Path) -> None:
    root = orin_nano_tree(tmp_path)
    source = Ina3221HwmonSource(root, ["1-0040"], "VDD_IN")
    t = [0.0]
    gpu = JetsonGpu.detect(root, source, clock=lambda: t[0])
    assert gpu is not None and gpu.rail_label == "VDD_CPU_GPU_CV"
    first = gpu.read()
    assert (first.load_pct, first.mem_mb, first.rail_energy_j) == (52.3, 200.0, 0.0)
    rail = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/curr2_input"
    t[0] = 2.0
    rail.write_text("800\n")  # 2 W -> 4 W: trapezoid over 2 s = 6 J
    assert gpu.read().rail_energy_j == pytest.approx(6.0)
    assert source.read_power_w() == pytest.approx(6.0)  # the board total stays VDD_IN alone
    (root / "sys/devices/platform/bus@0/17000000.gpu/load").write_text("1200\n")
    assert gpu.read().load_pct == 100.0


def test_no_gpu_on_a_pi_or_this_host(tmp_path: Path) -> None:
    put(tmp_path / "sys/devices/platform/emc/of_node/name", "emc")
    assert JetsonGpu.detect(tmp_path) is None


def test_telemetry_carries_the_gpu_figures_on_a_jetson_only(tmp_path: Path) -> None:
    root = orin_nano_tree(tmp_path / "jetson")
    limits = CgroupLimits(tmp_path / "no-cgroup", proc_cgroup=str(tmp_path / "no-proc-cgroup"))
    t = [0.0]
    sampler = Sampler(lambda: None, load_board("jetson-orin-nano"), root, limits, clock=lambda: t[0],
                      cpu_time_s=lambda: 0.0, monotonic=lambda: t[0], start_s=0.0)
    sampler.sample("idle")
    t[0] = 1.0
    row = sampler.sample("training")
    assert (row.gpu_pct, row.gpu_mem_mb, row.gpu_energy_j) == (52.3, 200.0, pytest.approx(2.0))
    pi = Sampler(lambda: None, load_board("rpi5"), tmp_path / "empty", limits, clock=lambda: t[0],
                 cpu_time_s=lambda: 0.0, monotonic=lambda: t[0], start_s=0.0)
    assert pi.sample("idle").gpu_pct is None


@pytest.mark.parametrize(("table", "want"), [
    ('python = "3"', "[runtime] python must be a CPython version like \"3.11\", got '3'"),
    ('arch = "riscv64"', "arch"),
    ('gpu = true', "unknown key 'gpu' in [runtime]"),
    ('execution_providers = "CUDAExecutionProvider"', "execution_providers"),
])
def test_bad_runtime_table_is_one_line(tmp_path: Path, table: str, want: str) -> None:
    text = (Path(load_board("rpi5").path)).read_text()
    start = text.index("[runtime]")
    end = text.index("[sources]")
    bad = tmp_path / "rpi5.toml"
    bad.write_text(text[:start] + f"[runtime]\n{table}\n\n" + text[end:])
    with pytest.raises(ConfigError) as exc:
        load_board(bad)
    assert want in str(exc.value) and "\n" not in str(exc.value)


def test_cpu_is_always_the_last_resort() -> None:
    assert load_board("rpi5").runtime.execution_providers == (CPU,)
    assert load_board("jetson-xavier-nx").runtime.python == "3.8"
