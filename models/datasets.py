"""Datasets: scikit-learn digits (the offline default), CIFAR-10 python batches, MNIST and
Fashion-MNIST IDX files, and a seeded synthetic generator for benchmarks. Fashion-MNIST needs no
root where Debian's dataset-fashion-mnist package is installed (`default_root`).

Every loader returns float32 images shaped (N, C, H, W) scaled to [0, 1] and int64 labels.
CIFAR-10 is deliberately not mean/std normalised: one [0, 1] convention for every dataset means
a model and its artifacts never need to carry normalisation constants.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError, DatasetError

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
ByteArray = npt.NDArray[np.uint8]

DATASET_NAMES = ("digits", "cifar10", "mnist", "fashion-mnist", "synthetic")
SPLITS = ("train", "test", "all")
# digits and synthetic have no published split; split="train"/"test" cuts them stratified by seed.
UNSPLIT_TEST_FRACTION = 0.2
SYNTHETIC_DEFAULT_N = 1000
SYNTHETIC_DEFAULT_SHAPE = (1, 8, 8)
SYNTHETIC_NOISE_STD = 0.3

DIGIT_NAMES = tuple(str(d) for d in range(10))
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_IMAGE_BYTES = 3 * 32 * 32
IDX_PREFIXES = {"train": "train", "test": "t10k"}
# Where Debian's dataset-fashion-mnist package puts the real files (gzipped IDX); `make data`
# installs it. ORCHARD_FASHION_MNIST overrides the folder (a test, or a copy elsewhere).
FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ROOT_ENV = "ORCHARD_FASHION_MNIST"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist  (or: make data)"


def default_root(name: str) -> Path | None:
    """The folder a dataset is read from when no root is given (None: it has no default)."""
    if name != "fashion-mnist":
        return None
    return Path(os.environ.get(FASHION_MNIST_ROOT_ENV) or FASHION_MNIST_DEFAULT_ROOT)


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields elementwise has no truth value
class Dataset:
    name: str
    x: FloatArray  # (N, *input_shape), C-contiguous
    y: IntArray  # (N,), values in [0, num_classes)
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = None
        if self.x.dtype != np.float32 or self.y.dtype != np.int64:
            problem = f"x must be float32 and y int64, got {self.x.dtype} and {self.y.dtype}"
        elif self.x.shape[1:] != tuple(self.input_shape) or self.y.shape != self.x.shape[:1]:
            problem = f"x {self.x.shape} and y {self.y.shape} do not fit input_shape {self.input_shape}"
        elif self.y.size and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            problem = f"labels span [{self.y.min()}, {self.y.max()}], expected [0, {self.num_classes})"
        elif self.class_names and len(self.class_names) != self.num_classes:
            problem = f"{len(self.class_names)} class names for {self.num_classes} classes"
        if problem:
            raise DatasetError(f"{self.name}: {problem}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: npt.ArrayLike) -> Dataset:
        """The samples at `idx` (integer indices or a boolean mask), copied, in the given order."""
        idx = np.asarray(idx)
        if idx.dtype == np.bool_ and idx.shape == self.y.shape:
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)  # np.array([]) is float64
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DatasetError(f"{self.name}: subset wants 1-D integer indices or a mask of "
                               f"{len(self)}, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = idx.min() if idx.min() < 0 else idx.max()
            raise DatasetError(f"{self.name}: subset index {bad} outside [0, {len(self)})")
        return dataclasses.replace(self, x=np.ascontiguousarray(self.x[idx]), y=self.y[idx])

    def label_histogram(self) -> IntArray:
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64)


def _stratified_pick(y: IntArray, num_classes: int, n_pick: int, rng: np.random.Generator) -> IntArray:
    """n_pick sorted indices with each class's share as close to its share of y as integers allow."""
    counts = np.bincount(y, minlength=num_classes)
    # Largest remainder in integer arithmetic, so quotas sum exactly to n_pick and never exceed counts.
    quota = counts * n_pick // len(y)
    remainder = counts * n_pick % len(y)
    short = n_pick - int(quota.sum())
    quota[np.argsort(-remainder, kind="stable")[:short]] += 1
    picked = [rng.choice(np.flatnonzero(y == c), size=int(quota[c]), replace=False)
              for c in np.flatnonzero(quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def train_test_split(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified (train, test) split, deterministic for a seed; each part keeps the original order."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = round(len(ds) * test_fraction)
    if not 0 < n_test < len(ds):
        raise ConfigError(f"{ds.name}: test_fraction {test_fraction} of {len(ds)} samples empties a side")
    test_idx = _stratified_pick(ds.y, ds.num_classes, n_test, np.random.default_rng(seed))
    keep = np.ones(len(ds), dtype=bool)
    keep[test_idx] = False
    return ds.subset(np.flatnonzero(keep)), ds.subset(test_idx)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits  # deferred: importing scikit-learn costs about a second

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[:, None]  # pixel values are 0..16
    return Dataset("digits", np.ascontiguousarray(x), np.asarray(bunch.target, dtype=np.int64), 10,
                   (1, 8, 8), DIGIT_NAMES)


def _synthetic(n: int, shape: tuple[int, ...], num_classes: int, seed: int) -> Dataset:
    if num_classes < 2 or n < num_classes:
        raise ConfigError(f"synthetic: need num_classes >= 2 and n >= num_classes, got n={n}, "
                          f"num_classes={num_classes}")
    if not shape or any(int(d) < 1 for d in shape):
        raise ConfigError(f"synthetic: shape must be non-empty positive dims, got {shape}")
    shape = tuple(int(d) for d in shape)
    rng = np.random.default_rng(seed)
    # Per-pixel noise (std 0.3) larger than the typical gap between class means (~0.2): no single
    # pixel tells classes apart, but all pixels together do, so a model must learn to beat chance.
    means = rng.uniform(0.2, 0.8, size=(num_classes, *shape)).astype(np.float32)
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)  # balanced classes
    x = means[y]
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(SYNTHETIC_NOISE_STD)
    np.clip(x, 0.0, 1.0, out=x)
    return Dataset("synthetic", x, y, num_classes, shape, tuple(str(c) for c in range(num_classes)))


def _folder(name: str, root: str | Path | None, holds: str) -> Path:
    if root is None:
        raise DatasetError(f"{name}: no root given; pass the folder holding {holds}")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{name}: folder {folder} does not exist (expected {holds})")
    return folder


def _read_idx(name: str, folder: Path, stem: str, ndim: int) -> ByteArray:
    """An unsigned-byte IDX file (big-endian header: magic 0x0000 08 <ndim>, then ndim uint32 dims)."""
    path = folder / stem if (folder / stem).is_file() else folder / f"{stem}.gz"
    if not path.is_file():
        raise DatasetError(f"{name}: missing {folder / stem} (or {stem}.gz)")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; a cut-off gzip stream is EOFError
        raise DatasetError(f"{name}: cannot read {path}: {exc}") from exc
    expected_magic = 0x0800 | ndim
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or magic != expected_magic:
        raise DatasetError(f"{name}: {path} has IDX magic 0x{magic:08x}, expected 0x{expected_magic:08x} "
                           f"(unsigned bytes, {ndim} dims)")
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DatasetError(f"{name}: {path} is truncated: {len(raw)} bytes, shorter than its "
                           f"{header_bytes}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    what = f"{dims[0]} images of {dims[1]}x{dims[2]}" if ndim == 3 else f"{dims[0]} labels"
    have = len(raw) - header_bytes
    if have != expected:
        state = "is truncated" if have < expected else "has trailing bytes"
        raise DatasetError(f"{name}: {path} {state}: header says {what} = {expected} bytes, "
                           f"file has {have} after the {header_bytes}-byte header")
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header_bytes).reshape(dims)


def _load_idx_dataset(name: str, root: str | Path | None, split: str) -> Dataset:
    holds = "train-/t10k-images-idx3-ubyte and -labels-idx1-ubyte (optionally .gz)"
    fallback = default_root(name)
    if root is None and fallback is not None and not fallback.is_dir():
        raise DatasetError(f"{name}: no data_root given and the default folder {fallback} does not exist; "
                           f"install it: {FASHION_MNIST_INSTALL}")
    folder = _folder(name, root if root is not None else fallback, holds)
    images: list[ByteArray] = []
    labels: list[ByteArray] = []
    for part in ("train", "test") if split == "all" else (split,):
        stem = IDX_PREFIXES[part]
        part_images = _read_idx(name, folder, f"{stem}-images-idx3-ubyte", 3)
        part_labels = _read_idx(name, folder, f"{stem}-labels-idx1-ubyte", 1)
        if len(part_images) != len(part_labels):
            raise DatasetError(f"{name}: {stem}-images-idx3-ubyte has {len(part_images)} images but "
                               f"{stem}-labels-idx1-ubyte has {len(part_labels)} labels in {folder}")
        if part_labels.size and part_labels.max() >= 10:
            raise DatasetError(f"{name}: {stem}-labels-idx1-ubyte in {folder} has label "
                               f"{part_labels.max()}, expected 0..9")
        if images and part_images.shape[1:] != images[0].shape[1:]:
            raise DatasetError(f"{name}: {stem} images are {part_images.shape[1:]} but train images are "
                               f"{images[0].shape[1:]} in {folder}")
        images.append(part_images)
        labels.append(part_labels)
    x = np.concatenate(images)[:, None].astype(np.float32) / np.float32(255)
    names = FASHION_MNIST_NAMES if name == "fashion-mnist" else DIGIT_NAMES
    return Dataset(name, x, np.concatenate(labels).astype(np.int64), 10, tuple(x.shape[1:]), names)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a swapped file in a data folder
    cannot run code when it is loaded."""

    # _codecs.encode: how Python 3 writes bytes at pickle protocol 2 (harmless string encoding).
    _ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{module}", function)  # numpy 2 renamed numpy.core to numpy._core
        for core in ("core", "_core")
        for module, function in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                 ("numeric", "_frombuffer"))})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # garbage bytes can fail in many ways; all mean "not a CIFAR batch"
        raise DatasetError(f"cifar10: {path} is not a readable python pickle: {exc}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"cifar10: {path} holds a {type(obj).__name__}, expected a dict")
    # Batches pickled by Python 2 have bytes keys, ones re-pickled by Python 3 often str keys.
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[ByteArray, IntArray]:
    if not path.is_file():
        raise DatasetError(f"cifar10: missing {path}")
    batch = _unpickle(path)
    missing = [f"b{key!r}" for key in ("data", "labels") if key not in batch]
    if missing:
        raise DatasetError(f"cifar10: {path} lacks key {' and '.join(missing)}; a CIFAR batch is a dict "
                           f"with b'data' (N x {CIFAR10_IMAGE_BYTES} uint8) and b'labels'")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR10_IMAGE_BYTES:
        raise DatasetError(f"cifar10: {path} b'data' is {data.dtype} {data.shape}, "
                           f"expected uint8 (N, {CIFAR10_IMAGE_BYTES})")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"cifar10: {path} b'labels' are not integers: {exc}") from exc
    if len(labels) != len(data):
        raise DatasetError(f"cifar10: {path} has {len(data)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise DatasetError(f"cifar10: {path} has label {labels.min() if labels.min() < 0 else labels.max()}, "
                           "expected 0..9")
    return data, labels


def _load_cifar10(root: str | Path | None, split: str) -> Dataset:
    folder = _folder("cifar10", root, "the cifar-10-batches-py files")
    if not (folder / "test_batch").exists() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"  # accept the folder the official tarball unpacks into
    files = CIFAR10_BATCHES["train"] + CIFAR10_BATCHES["test"] if split == "all" else CIFAR10_BATCHES[split]
    batches = [_read_cifar_batch(folder / f) for f in files]
    # Rows are 1024 red, 1024 green, 1024 blue bytes, each plane row-major 32x32.
    x = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255)
    y = np.concatenate([lab for _, lab in batches])
    names: tuple[str, ...] = CIFAR10_NAMES
    if (folder / "batches.meta").is_file():
        label_names = _unpickle(folder / "batches.meta").get("label_names")
        if isinstance(label_names, list) and len(label_names) == 10:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in label_names)
    return Dataset("cifar10", x, y, 10, (3, 32, 32), names)


def load_dataset(name: str, root: str | Path | None = None, *, seed: int = 0, n: int | None = None,
                 shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 split: str = "all") -> Dataset:
    """Load a dataset by name.

    split: "train", "test" or "all" (both concatenated, train first). CIFAR-10 and MNIST use their
    published split; digits and synthetic are split stratified by seed with test fraction 0.2,
    exactly as `train_test_split(load_dataset(name, seed=s), 0.2, s)`.
    n: keep a stratified subset of n samples (chosen by seed) of the split; for synthetic it is
    the number of samples generated before any split (default 1000).
    shape, num_classes: free for synthetic (default (1, 8, 8) and 10); for stored datasets they
    are only checked against the data.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in DATASET_NAMES:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ConfigError(f"{key}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n is not None and n < 1:
        raise ConfigError(f"{key}: n must be >= 1, got {n}")
    if key == "synthetic":
        ds = _synthetic(n or SYNTHETIC_DEFAULT_N, shape or SYNTHETIC_DEFAULT_SHAPE, num_classes or 10, seed)
        n = None  # already the generated size
    elif key == "digits":
        ds = _load_digits()
    elif key == "cifar10":
        ds = _load_cifar10(root, split)
    else:
        ds = _load_idx_dataset(key, root, split)
    if shape is not None and tuple(shape) != ds.input_shape:
        raise ConfigError(f"{key}: samples are {ds.input_shape}, but shape={tuple(shape)} was asked")
    if num_classes is not None and num_classes != ds.num_classes:
        raise ConfigError(f"{key}: has {ds.num_classes} classes, but num_classes={num_classes} was asked")
    if key in ("digits", "synthetic") and split != "all":
        train, test = train_test_split(ds, UNSPLIT_TEST_FRACTION, seed)
        ds = train if split == "train" else test
    if n is not None:
        if n > len(ds):
            raise ConfigError(f"{key}: n={n} asked, but split {split!r} has only {len(ds)} samples")
        if n < len(ds):
            ds = ds.subset(_stratified_pick(ds.y, ds.num_classes, n, np.random.default_rng((seed, 1))))
    return ds
