"""`orchard bundle --ort-wheel`: a wheel is checked by its tags against the board's Python and
machine, and by its contents for the training API, before anything is copied; each failure is
one line that names the check. The real PyPI x86_64 wheel passes for an x86_64 "board"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import ConfigError
from testbed.board_wheels import board_lock, check_ort_wheel
from testbed.bundle import _wheel_cache, build_bundle
from tests.unit.fake_wheels import CORE, TRAINING_API, fake_ort_wheel

ROOT = Path(__file__).resolve().parents[2]
GOOD_NAME = "onnxruntime_training-1.19.2-cp311-cp311-linux_aarch64.whl"


@pytest.fixture(scope="module")
def pypi_x86_wheel() -> Path:
    """PyPI's onnxruntime-training-cpu 1.19.2 for CPython 3.11 on x86_64 (downloaded once, cached)."""
    _, wheels = board_lock("3.11", "x86_64", _wheel_cache(), with_ort=True)
    [wheel] = [w for w in wheels if w.name.startswith("onnxruntime_training")]
    return wheel


def _one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_a_built_aarch64_wheel_in_the_real_layout_passes(tmp_path: Path) -> None:
    wheel = check_ort_wheel(fake_ort_wheel(tmp_path / GOOD_NAME), "3.11", "aarch64")
    assert wheel.version == "1.19.2" and not wheel.cuda
    cuda = fake_ort_wheel(tmp_path / "onnxruntime_training-1.19.2-cp310-cp310-linux_aarch64.whl",
                          files=(*CORE, *TRAINING_API, "onnxruntime/capi/libonnxruntime_providers_cuda.so"))
    assert check_ort_wheel(cuda, "3.10", "aarch64").cuda


@pytest.mark.parametrize(("name", "python", "arch", "tags", "want"), [
    (GOOD_NAME, "3.10", "aarch64", None, "wrong tags cp311-cp311-linux_aarch64 for this board (CPython 3.10, aarch64)"),
    (GOOD_NAME, "3.11", "x86_64", None, "wrong tags cp311-cp311-linux_aarch64 for this board (CPython 3.11, x86_64)"),
    # The WHEEL file's tags decide, not a renamed file.
    (GOOD_NAME, "3.11", "aarch64", ["cp38-cp38-linux_aarch64"], "wrong tags cp38-cp38-linux_aarch64"),
    ("onnxruntime-1.19.2-cp311-cp311-linux_aarch64.whl", "3.11", "aarch64", None, "is not onnxruntime-training"),
    ("onnxruntime_training-1.19.2-cp311-linux_aarch64.whl", "3.11", "aarch64", None, "not a wheel file name"),
    ("onnxruntime_training-1.20.0-cp311-cp311-linux_aarch64.whl", "3.11", "aarch64", None, "version 1.20.0"),
])
def test_wrong_tags_name_or_version_is_one_line(tmp_path: Path, name: str, python: str, arch: str,
                                                 tags: list[str] | None, want: str) -> None:
    path = tmp_path / name
    if name.count("-") == 4:
        fake_ort_wheel(path, tags=tags)
    else:
        path.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(ConfigError) as exc:
        check_ort_wheel(path, python, arch)
    assert want in _one_line(exc)


def test_a_wheel_without_the_training_api_is_one_line(tmp_path: Path) -> None:
    inference_only = fake_ort_wheel(tmp_path / GOOD_NAME, files=CORE)
    with pytest.raises(ConfigError) as exc:
        check_ort_wheel(inference_only, "3.11", "aarch64")
    assert _one_line(exc) == (f"--ort-wheel {GOOD_NAME}: no training API (onnxruntime/training/api/module.py "
                              "missing): the wheel was built without --enable_training_apis")
    broken = tmp_path / "x" / GOOD_NAME
    broken.parent.mkdir()
    broken.write_bytes(b"not a zip")
    with pytest.raises(ConfigError) as exc:
        check_ort_wheel(broken, "3.11", "aarch64")
    assert "not a readable wheel (zip)" in _one_line(exc)


def test_bundle_refuses_a_bad_wheel_before_copying_anything(tmp_path: Path) -> None:
    wheel = fake_ort_wheel(tmp_path / GOOD_NAME, files=CORE)
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "bundle", "--board", "rpi4b-4gb", "--broker",
                           "mqtt://10.0.0.2:1883", "--out", str(out), "--ort-wheel", str(wheel)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --ort-wheel ")
    assert "training API" in proc.stderr
    assert not out.exists()


def test_the_pypi_x86_64_wheel_is_accepted_for_an_x86_64_board(tmp_path: Path, pypi_x86_wheel: Path) -> None:
    assert check_ort_wheel(pypi_x86_wheel, "3.11", "x86_64").version == "1.19.2"
    with pytest.raises(ConfigError, match="wrong tags"):
        check_ort_wheel(pypi_x86_wheel, "3.11", "aarch64")
    tar = build_bundle("rpi4b-4gb", tmp_path, device_id="x1", broker_url="mqtt://h:1883", root="orchard/x",
                       profiles=["dense"], model=None, dataset=None, shard=None, arch="x86_64",
                       ort_wheel=pypi_x86_wheel)
    bundle = tar.parent / "orchard-rpi4b-4gb-x1"
    assert (bundle / "wheels" / pypi_x86_wheel.name).read_bytes() == pypi_x86_wheel.read_bytes()
    lock = (bundle / "requirements.lock").read_text()
    assert lock.count("onnxruntime-training-cpu==1.19.2 --hash=sha256:") == 1 and "onnx==" not in lock
    target = json.loads((bundle / "MANIFEST.json").read_text())["target"]
    assert target == {"python": "3.11", "arch": "x86_64", "ort_wheel": pypi_x86_wheel.name, "ort_cuda": False}


def test_a_board_python_below_38_or_a_bad_override_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"runs CPython 3.6 .*needs 3.8\+"):
        build_bundle("jetson-nano", tmp_path, device_id=None, broker_url="mqtt://h:1883", root="orchard/x",
                     profiles=["dense"], model=None, dataset=None, shard=None)
    with pytest.raises(ConfigError, match="--board-python '3'"):
        build_bundle("rpi5", tmp_path, device_id=None, broker_url="mqtt://h:1883", root="orchard/x",
                     profiles=["dense"], model=None, dataset=None, shard=None, board_python="3")
    assert not any(tmp_path.iterdir())
