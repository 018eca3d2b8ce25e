"""The agent's numpy-free shard reader (runtime/shard.py) against numpy's own np.load + bincount."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ConfigError
from runtime.shard import label_histogram, read_labels


def _reference(path: Path) -> tuple[int, tuple[int, ...]]:
    # What the agent computed before (np.load, astype(int64), bincount).
    with np.load(path) as shard:
        labels = shard["y"].astype(np.int64)
    return len(labels), tuple(int(c) for c in np.bincount(labels)) if len(labels) else ()


@pytest.mark.parametrize("dtype", ["<i8", ">i8", "<i4", ">i2", "|i1", "|u1", "<u2", "<u4", ">u8", "<f4", ">f8",
                                   "|b1"])
@pytest.mark.parametrize("compressed", [False, True])
def test_histogram_matches_numpy(tmp_path: Path, dtype: str, compressed: bool) -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2 if dtype == "|b1" else 10, size=257).astype(dtype)
    path = tmp_path / "shard.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=np.zeros((257, 2), np.float32), y=y)
    assert label_histogram(path) == _reference(path)
    assert read_labels(path) == [int(v) for v in y.astype(np.int64)]


def test_empty_shard(tmp_path: Path) -> None:
    path = tmp_path / "shard.npz"
    np.savez(path, x=np.zeros((0, 2), np.float32), y=np.zeros(0, np.int64))
    assert label_histogram(path) == _reference(path) == (0, ())


def test_large_header_format_v2(tmp_path: Path) -> None:
    path = tmp_path / "shard.npz"
    y = np.arange(12, dtype=np.int64) % 5
    import zipfile

    from numpy.lib import format as npy_format

    with zipfile.ZipFile(path, "w") as z, z.open("y.npy", "w") as f:
        npy_format.write_array(f, y, version=(2, 0))
    assert label_histogram(path) == (12, (3, 3, 2, 2, 2))


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b"not a zip"), "cannot read the shard"),
    (lambda p: np.savez(p, x=np.zeros(3)), "shard has no array 'y'"),
    (lambda p: np.savez(p, y=np.array([1, -2, 3])), "negative label"),
    (lambda p: np.savez(p, y=np.zeros((2, 2), np.int64)), "labels must be 1-D"),
    (lambda p: np.savez(p, y=np.array(["a", "b"])), "is not a label type"),
    (lambda p: np.savez(p, y=np.zeros(2, np.complex64)), "is not a label type"),
])
def test_bad_shards_are_one_clear_error(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "shard.npz"
    make(path)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        label_histogram(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the shard"):
        label_histogram(tmp_path / "nope.npz")


def _npy_with_header(header: str) -> bytes:
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + bytes(16)


@pytest.mark.parametrize(("header", "message"), [
    ("{'descr': '<i8', 'shape': (2,), }", "bad .npy header"),  # no fortran_order
    ("{'descr': '<i8', 'fortran_order': False, 'shape': (2, x), }", "bad .npy header"),
    ("[1, 2]", "bad .npy header"),
    ("{'descr': '<i8', 'fortran_order': True, 'shape': (2, 2), }", "Fortran-ordered"),
    ("{'descr': '<i8', 'fortran_order': False, 'shape': (), }", "labels must be 1-D, got shape ()"),
])
def test_a_bad_npy_header_is_one_clear_error(tmp_path: Path, header: str, message: str) -> None:
    import zipfile

    path = tmp_path / "shard.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("y.npy", _npy_with_header(header))
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_labels(path)
