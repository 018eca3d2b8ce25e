"""`orchard train` and `orchard artifacts build`, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def orchard(*args: str, cache: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHARD_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_cnn_half_width_reaches_90_percent(tmp_path, artifact_cache):
    out = tmp_path / "out.json"
    proc = orchard("train", "--model", "cnn", "--dataset", "digits", "--profile", "width=0.5",
                   "--steps", "300", "--json", str(out), cache=artifact_cache)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    for key in ("model", "profile", "params", "flops_per_sample", "steps", "loss_first", "loss_last",
                "eval_accuracy", "step_ms_median", "peak_rss_mb"):
        assert key in r
    assert r["model"] == "cnn" and r["profile"] == "width=0.5" and r["steps"] == 300
    assert r["eval_accuracy"] >= 0.90
    assert r["loss_last"] < r["loss_first"]
    assert r["params"] < r["params_full"] / 3  # half width keeps about a quarter of the weights
    assert r["peak_rss_mb"] > 0 and r["step_ms_median"] > 0


def test_class_subset_trains_only_its_classes(tmp_path, artifact_cache):
    out = tmp_path / "o.json"
    proc = orchard("train", "--model", "mlp", "--profile", "classes=0-2", "--steps", "100",
                   "--json", str(out), cache=artifact_cache)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["profile"] == "classes=0+1+2"
    assert r["train_samples"] < 0.4 * 1437  # only three of ten classes
    assert r["eval_accuracy"] > 0.9  # a three-way problem


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--model", "vit"], "invalid choice: 'vit'"),
        (["train", "--model", "cnn", "--profile", "width=0"], "width 0.0 is outside (0, 1]"),
        (["train", "--model", "cnn", "--profile", "width=1.5"], "width 1.5 is outside (0, 1]"),
        (["train", "--model", "cnn", "--profile", "classes="], "class subset is empty"),
        (["train", "--model", "cnn", "--profile", "classes=3-1"], "'3-1' is empty"),
        (["train", "--model", "cnn", "--profile", "classes=0-12"], "exceeds the model's 10 classes"),
        (["train", "--model", "cnn", "--profile", "height=2"], "unknown profile key 'height'"),
        (["train", "--model", "cnn", "--profile", "depth=2"], "profile depth 2.0 is outside (0, 1]"),
        (["train", "--model", "cnn", "--profile", "depth=0.5"], "a depth needs a multi-exit graph variant"),
        (["train", "--model", "cnn", "--dataset", "imagenet"], "imagenet"),
        (["train", "--model", "cnn", "--dataset", "mnist", "--data-root", "/nonexistent/mnist"], "/nonexistent/mnist"),
        (["train", "--model", "cnn", "--steps", "0"], "steps > 0"),
        (["train", "--model", "cnn", "--lr", "-1"], "learning rate -1"),
    ],
)
def test_bad_input_is_one_clear_line(args, needle, artifact_cache):
    proc = orchard(*args, cache=artifact_cache)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]


def test_truncated_dataset_folder_is_one_clear_line(tmp_path, artifact_cache):
    import gzip
    import struct

    root = tmp_path / "mnist"
    root.mkdir()
    files = (("train-images-idx3-ubyte", 2051, (60000, 28, 28)), ("train-labels-idx1-ubyte", 2049, (60000,)),
             ("t10k-images-idx3-ubyte", 2051, (10000, 28, 28)), ("t10k-labels-idx1-ubyte", 2049, (10000,)))
    for stem, magic, dims in files:
        header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)
        with gzip.open(root / f"{stem}.gz", "wb") as f:
            f.write(header + b"\0" * 100)  # far fewer bytes than the header promises
    proc = orchard("train", "--model", "mlp", "--dataset", "mnist", "--data-root", str(root), cache=artifact_cache)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "truncated" in lines[0] and "ubyte" in lines[0]


def test_artifacts_build_reports_rebuild_of_corrupt_entry(tmp_path):
    cache = tmp_path / "cache"
    first = orchard("artifacts", "build", "--model", "lenet", "--profiles", "dense", "width=0.5", cache=cache)
    assert first.returncode == 0, first.stderr
    keys = [line.split()[1] for line in first.stdout.splitlines()]
    assert len(set(keys)) == 2
    victim = cache / "artifacts" / keys[1] / "training_model.onnx"
    victim.write_bytes(victim.read_bytes()[:-10])
    second = orchard("artifacts", "build", "--model", "lenet", "--profiles", "dense", "width=0.5", cache=cache)
    assert second.returncode == 0, second.stderr
    assert "rebuilt" in second.stdout.splitlines()[1] and "rebuilt" not in second.stdout.splitlines()[0]


def test_every_command_has_help(artifact_cache):
    for args in (["--help"], ["train", "--help"], ["artifacts", "build", "--help"], ["federate", "--help"],
                 ["campaign", "run", "--help"], ["campaign", "sweep", "--help"], ["campaign", "compare", "--help"],
                 ["report", "--help"],
                 ["bundle", "--help"], ["flash", "--help"], ["server", "--help"], ["device", "--help"]):
        proc = orchard(*args, cache=artifact_cache)
        assert proc.returncode == 0 and "usage:" in proc.stdout
