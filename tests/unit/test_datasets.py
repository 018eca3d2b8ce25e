"""Dataset readers against small files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from models.datasets import (
    FASHION_MNIST_DEFAULT_ROOT,
    FASHION_MNIST_ROOT_ENV,
    Dataset,
    load_dataset,
    train_test_split,
)
from runtime.errors import ConfigError, DatasetError

Array = npt.NDArray[np.generic]


def write_idx(path: Path, array: Array, *, gz: bool = False, magic: int | None = None) -> Path:
    """An unsigned-byte IDX file: big-endian magic 0x000008<ndim>, ndim uint32 dims, then the bytes."""
    header = (magic if magic is not None else 0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_mnist(folder: Path, *, gz: bool = False, n_train: int = 12, n_test: int = 5,
               side: int = 28) -> dict[str, tuple[Array, Array]]:
    rng = np.random.default_rng(7)
    parts: dict[str, tuple[Array, Array]] = {}
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(count, side, side), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
        parts[prefix] = (images, labels)
    return parts


def write_cifar_batch(path: Path, data: Array, labels: list[int], protocol: int = 2,
                      drop: str | None = None) -> None:
    batch = {b"batch_label": b"testing batch", b"data": data, b"labels": labels,
             b"filenames": [b"img%d.png" % i for i in range(len(labels))]}
    batch.pop(drop.encode() if drop else b"", None)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def make_cifar(folder: Path, *, per_batch: int = 3, protocol: int = 2) -> tuple[Array, Array]:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    datas, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch_labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        write_cifar_batch(folder / name, data, batch_labels, protocol)
        datas.append(data)
        labels.append(batch_labels)
    return np.concatenate(datas), np.concatenate(labels)


# ---------------------------------------------------------------- digits, synthetic, splitting


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_shape_range_and_types(digits: Dataset) -> None:
    assert digits.x.shape == (1797, 1, 8, 8) and digits.input_shape == (1, 8, 8)
    assert digits.x.dtype == np.float32 and digits.x.flags.c_contiguous
    assert digits.y.dtype == np.int64 and digits.num_classes == 10
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0
    assert digits.class_names == tuple("0123456789")
    hist = digits.label_histogram()
    assert hist.dtype == np.int64 and hist.sum() == 1797 and hist.min() >= 170


def test_subset_copies_in_order_and_checks_range(digits: Dataset) -> None:
    sub = digits.subset(np.array([5, 0, 5]))
    np.testing.assert_array_equal(sub.x, digits.x[[5, 0, 5]])
    np.testing.assert_array_equal(sub.y, digits.y[[5, 0, 5]])
    assert sub.x.flags.c_contiguous and len(sub) == 3
    mask = digits.y == 3
    assert len(digits.subset(mask)) == mask.sum()
    assert len(digits.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(DatasetError, match="1797"):
        digits.subset(np.array([1797]))
    with pytest.raises(DatasetError, match="-1"):
        digits.subset(np.array([-1]))


def test_dataset_rejects_inconsistent_fields() -> None:
    x = np.zeros((4, 1, 2, 2), np.float32)
    with pytest.raises(DatasetError, match=r"labels span \[0, 5\], expected \[0, 3\)"):
        Dataset("toy", x, np.array([0, 1, 2, 5]), 3, (1, 2, 2))
    with pytest.raises(DatasetError, match="input_shape"):
        Dataset("toy", x, np.zeros(4, np.int64), 3, (1, 4, 1))
    with pytest.raises(DatasetError, match="float32"):
        Dataset("toy", x.astype(np.float64), np.zeros(4, np.int64), 3, (1, 2, 2))


def test_train_test_split_is_stratified_disjoint_and_deterministic() -> None:
    # Each sample's pixels hold its own index, so the split can be traced back exactly.
    labels = np.repeat(np.arange(4), [50, 30, 15, 8])
    toy = Dataset("toy", np.arange(103, dtype=np.float32).reshape(103, 1, 1, 1), labels, 4, (1, 1, 1))
    train, test = train_test_split(toy, 0.25, seed=1)
    train_ids, test_ids = train.x.ravel().astype(int), test.x.ravel().astype(int)
    assert len(test) == 26 and len(train) == 77
    assert set(train_ids).isdisjoint(test_ids) and set(train_ids) | set(test_ids) == set(range(103))
    assert (np.diff(train_ids) > 0).all() and (np.diff(test_ids) > 0).all()  # original order kept
    np.testing.assert_array_equal(labels[test_ids], test.y)
    # Stratified: each class's test count is within one of its exact share.
    assert (np.abs(test.label_histogram() - toy.label_histogram() * 26 / 103) < 1).all()
    np.testing.assert_array_equal(train_test_split(toy, 0.25, seed=1)[1].x, test.x)
    assert not np.array_equal(train_test_split(toy, 0.25, seed=2)[1].x, test.x)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1e-6])
def test_train_test_split_rejects_bad_fractions(digits: Dataset, fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        train_test_split(digits, fraction, seed=0)


def test_digits_split_and_n(digits: Dataset) -> None:
    train = load_dataset("digits", split="train", seed=4)
    test = load_dataset("digits", split="test", seed=4)
    ref_train, ref_test = train_test_split(digits, 0.2, 4)
    np.testing.assert_array_equal(train.x, ref_train.x)
    np.testing.assert_array_equal(test.y, ref_test.y)
    small = load_dataset("digits", n=100, seed=4)
    assert len(small) == 100 and small.label_histogram().min() >= 9
    np.testing.assert_array_equal(small.x, load_dataset("digits", n=100, seed=4).x)
    with pytest.raises(ConfigError, match="n=5000"):
        load_dataset("digits", n=5000)
    with pytest.raises(ConfigError, match=r"shape=\(1, 28, 28\)"):
        load_dataset("digits", shape=(1, 28, 28))
    with pytest.raises(ConfigError, match="num_classes=5"):
        load_dataset("digits", num_classes=5)


def test_synthetic_is_deterministic_bounded_and_learnable() -> None:
    ds = load_dataset("synthetic", n=600, shape=(3, 6, 6), num_classes=6, seed=11)
    assert ds.x.shape == (600, 3, 6, 6) and ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    assert (ds.label_histogram() == 100).all()
    np.testing.assert_array_equal(ds.x, load_dataset("synthetic", n=600, shape=(3, 6, 6), num_classes=6,
                                                     seed=11).x)
    assert not np.array_equal(ds.x, load_dataset("synthetic", n=600, shape=(3, 6, 6), num_classes=6,
                                                 seed=12).x)
    # Learnable: nearest class mean fitted on train beats chance (1/6) by far on held-out test.
    train, test = train_test_split(ds, 0.3, seed=0)
    flat_train, flat_test = train.x.reshape(len(train), -1), test.x.reshape(len(test), -1)
    centroids = np.stack([flat_train[train.y == c].mean(axis=0) for c in range(6)])
    predicted = np.argmin(((flat_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == test.y).mean() > 0.8
    # ... but a single pixel does not give it away.
    pixel = flat_train[:, 0]
    assert np.corrcoef(pixel, train.y)[0, 1] ** 2 < 0.5


def test_synthetic_split_and_bad_parameters() -> None:
    train = load_dataset("synthetic", split="train", seed=0)
    assert len(train) == 800 and train.input_shape == (1, 8, 8) and train.num_classes == 10
    with pytest.raises(ConfigError, match="n=5, num_classes=10"):
        load_dataset("synthetic", n=5)
    with pytest.raises(ConfigError, match="shape"):
        load_dataset("synthetic", shape=(1, 0, 8))


def test_unknown_name_and_split() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; expected one of digits"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        load_dataset("digits", split="val")


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_back_exactly(tmp_path: Path, gz: bool) -> None:
    parts = make_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.x.shape == (17, 1, 28, 28) and ds.x.dtype == np.float32 and ds.x.flags.c_contiguous
    images = np.concatenate([parts["train"][0], parts["t10k"][0]])
    labels = np.concatenate([parts["train"][1], parts["t10k"][1]])
    np.testing.assert_array_equal(np.rint(ds.x[:, 0] * 255).astype(np.uint8), images)
    np.testing.assert_array_equal(ds.y, labels.astype(np.int64))
    test = load_dataset("mnist", str(tmp_path), split="test")
    np.testing.assert_array_equal(test.y, parts["t10k"][1])
    assert len(load_dataset("mnist", tmp_path, split="train")) == 12


def test_fashion_mnist_names_and_odd_image_size(tmp_path: Path) -> None:
    make_mnist(tmp_path, side=5, gz=True)
    ds = load_dataset("fashion_mnist", tmp_path, split="train")
    assert ds.name == "fashion-mnist" and ds.input_shape == (1, 5, 5) and ds.class_names[9] == "Ankle boot"


def test_fashion_mnist_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_mnist(tmp_path, side=5, gz=True)
    monkeypatch.setenv(FASHION_MNIST_ROOT_ENV, str(tmp_path))
    assert len(load_dataset("fashion-mnist", split="train")) == 12  # no root: the default folder
    monkeypatch.setenv(FASHION_MNIST_ROOT_ENV, str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match=r"fashion-mnist: no data_root given and the default folder "
                                           rf"{tmp_path / 'absent'} does not exist; install it: apt-get install "
                                           r"dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


@pytest.mark.skipif(not FASHION_MNIST_DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_ROOT_ENV, raising=False)
    test = load_dataset("fashion-mnist", split="test")
    assert len(test) == 10_000 and test.input_shape == (1, 28, 28)
    assert np.array_equal(test.label_histogram(), np.full(10, 1000))  # the published test split is balanced
    assert 0.2 < float(test.x.mean()) < 0.4  # real images, scaled to [0, 1]


def test_idx_missing_root_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="mnist: no root given"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match=f"folder {tmp_path / 'nope'} does not exist"):
        load_dataset("mnist", tmp_path / "nope")
    make_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(DatasetError, match=r"missing \S*/t10k-labels-idx1-ubyte \(or t10k-\S+\.gz\)"):
        load_dataset("mnist", tmp_path)
    assert len(load_dataset("mnist", tmp_path, split="train")) == 12  # only the test part is missing


def test_idx_truncated_plain(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[: 16 + 1000])
    with pytest.raises(DatasetError, match=rf"mnist: {path} is truncated: header says 12 images of 28x28 = "
                                           r"9408 bytes, file has 1000 after the 16-byte header"):
        load_dataset("mnist", tmp_path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DatasetError, match="shorter than its 16-byte header"):
        load_dataset("mnist", tmp_path)


def test_idx_truncated_gz_and_trailing_bytes(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=f"cannot read {path}"):
        load_dataset("mnist", tmp_path)
    path.write_bytes(gzip.compress(gzip.decompress(blob) + b"\0\0"))
    with pytest.raises(DatasetError, match="trailing bytes: header says 12 labels = 12 bytes, file has 14"):
        load_dataset("mnist", tmp_path)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    # A labels file where images are expected: magic 0x00000801 instead of 0x00000803.
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(12, np.uint8))
    with pytest.raises(DatasetError, match="magic 0x00000801, expected 0x00000803"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((12, 28, 28), np.uint8), magic=0x0D03)
    with pytest.raises(DatasetError, match="magic 0x00000d03"):
        load_dataset("mnist", tmp_path)


def test_idx_count_mismatch_and_bad_labels(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte has 12 images but "
                                           "train-labels-idx1-ubyte has 11 labels"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 10, np.uint8))
    with pytest.raises(DatasetError, match=r"has label 10, expected 0\.\.9"):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------- CIFAR-10 (python batches)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_reads_back_exactly(tmp_path: Path, protocol: int) -> None:
    data, labels = make_cifar(tmp_path, protocol=protocol)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x.shape == (18, 3, 32, 32) and ds.x.dtype == np.float32 and ds.x.flags.c_contiguous
    assert ds.class_names[0] == "airplane"
    np.testing.assert_array_equal(ds.y, labels)
    restored = np.rint(ds.x * 255).astype(np.uint8)
    # Layout: 1024 red, then green, then blue bytes, each plane row-major.
    assert restored[4, 1, 2, 3] == data[4, 1024 + 2 * 32 + 3]
    np.testing.assert_array_equal(restored.reshape(18, -1), data)
    test = load_dataset("cifar10", tmp_path, split="test")
    np.testing.assert_array_equal(test.y, labels[-3:])
    assert len(load_dataset("cifar10", tmp_path, split="train", n=10, seed=1)) == 10


def test_cifar_tarball_folder_meta_and_str_keys(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    names = [b"n%d" % i for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    # A batch re-pickled by Python 3 with str keys reads the same.
    data = np.arange(3072 * 2, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": [9, 0]}))
    ds = load_dataset("cifar10", tmp_path, split="test")
    assert ds.class_names == tuple(f"n{i}" for i in range(10))
    np.testing.assert_array_equal(ds.y, [9, 0])


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"cifar10: folder \S+ does not exist"):
        load_dataset("cifar10", tmp_path / "absent")
    make_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(DatasetError, match=f"cifar10: missing {tmp_path / 'data_batch_3'}"):
        load_dataset("cifar10", tmp_path)
    good = np.zeros((2, 3072), np.uint8)
    batch = tmp_path / "test_batch"
    write_cifar_batch(batch, good, [1, 2], drop="labels")
    with pytest.raises(DatasetError, match=r"test_batch lacks key b'labels'; a CIFAR batch is a dict"):
        load_dataset("cifar10", tmp_path, split="test")
    write_cifar_batch(batch, good, [1, 2, 3])
    with pytest.raises(DatasetError, match="has 2 images but 3 labels"):
        load_dataset("cifar10", tmp_path, split="test")
    write_cifar_batch(batch, np.zeros((2, 1024), np.uint8), [1, 2])
    with pytest.raises(DatasetError, match=r"b'data' is uint8 \(2, 1024\), expected uint8 \(N, 3072\)"):
        load_dataset("cifar10", tmp_path, split="test")
    write_cifar_batch(batch, good, [1, 12])
    with pytest.raises(DatasetError, match="has label 12"):
        load_dataset("cifar10", tmp_path, split="test")
    batch.write_bytes(pickle.dumps([good]))
    with pytest.raises(DatasetError, match="holds a list, expected a dict"):
        load_dataset("cifar10", tmp_path, split="test")
    batch.write_bytes(pickle.dumps({b"data": good})[:-10])
    with pytest.raises(DatasetError, match="not a readable python pickle"):
        load_dataset("cifar10", tmp_path, split="test")


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_cifar_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Boom(), b"labels": []}))
    with pytest.raises(DatasetError, match=r"refusing global (posix|os|nt)\.system"):
        load_dataset("cifar10", tmp_path, split="test")
