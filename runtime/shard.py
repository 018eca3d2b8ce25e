"""A device shard's labels, read without numpy: what the agent's hello needs (sample count and
label histogram) before anything else is imported.

The shard is an `np.savez` file (a zip of .npy members, runtime/device_config.py); `y` is read by
parsing the .npy header (format versions 1-3) and the raw buffer with the `array` module. The
agent stays off numpy until its first task (issue 16: numpy is ~25 MB of an idle agent's RSS and
most of its import time); the trainer child reads the same shard with numpy (a test checks both
agree).
"""

from __future__ import annotations

import array
import re
import struct
import sys
import zipfile
from pathlib import Path

from runtime.errors import ConfigError

_MAGIC = b"\x93NUMPY"
# The header is the repr of a dict of these three keys (numpy's format spec). Read with these, not
# ast.literal_eval: `import ast` is ~2 ms of a Zero 2 W's ~95 ms of CPU to the hello.
_DESCR = re.compile(r"""['"]descr['"]\s*:\s*['"]([^'"]*)['"]""")
_FORTRAN = re.compile(r"""['"]fortran_order['"]\s*:\s*(True|False)\b""")
_SHAPE = re.compile(r"""['"]shape['"]\s*:\s*\(\s*((?:\d+\s*,\s*)*\d*)\s*\)""")
# .npy descr kind -> array typecode by item size; 'q'/'Q' are 8 bytes everywhere, 'l' is not.
_TYPECODES: dict[str, dict[int, str]] = {
    "i": {1: "b", 2: "h", 4: "i", 8: "q"},
    "u": {1: "B", 2: "H", 4: "I", 8: "Q"},
    "b": {1: "B"},
    "f": {4: "f", 8: "d"},
}


def _read_npy(data: bytes, where: str) -> tuple[str, tuple[int, ...], memoryview]:
    if data[:6] != _MAGIC or len(data) < 10:
        raise ConfigError(f"{where}: not a .npy array")
    major = data[6]
    if major == 1:
        (hlen,), start = struct.unpack("<H", data[8:10]), 10
    elif major in (2, 3):
        (hlen,), start = struct.unpack("<I", data[8:12]), 12
    else:
        raise ConfigError(f"{where}: .npy format version {major} is not supported")
    text = data[start:start + hlen].decode("latin1")
    descr, fortran, shape_text = (p.search(text) for p in (_DESCR, _FORTRAN, _SHAPE))
    if descr is None or fortran is None or shape_text is None or not text.lstrip().startswith("{"):
        raise ConfigError(f"{where}: bad .npy header {text.strip()[:80]!r}")
    shape = tuple(int(d) for d in shape_text.group(1).split(",") if d.strip())
    if fortran.group(1) == "True" and len(shape) > 1:
        raise ConfigError(f"{where}: Fortran-ordered arrays are not supported")
    return descr.group(1), shape, memoryview(data)[start + hlen:]


def read_labels(path: str | Path, name: str = "y") -> list[int]:
    """The 1-D label array `name` of an .npz as Python ints (floats truncated, as astype(int64))."""
    where = f"{path}: {name}"
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(f"{name}.npy")
    except KeyError:
        raise ConfigError(f"{path}: shard has no array {name!r}") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: cannot read the shard: {exc}") from None
    descr, shape, buf = _read_npy(data, where)
    if len(shape) != 1:
        raise ConfigError(f"{where}: labels must be 1-D, got shape {shape}")
    order, kind, size = descr[0], descr[1:2], descr[2:]
    code = _TYPECODES.get(kind, {}).get(int(size) if size.isdigit() else 0)
    if code is None or order not in "<>|=":
        raise ConfigError(f"{where}: dtype {descr!r} is not a label type (int, uint, bool or float)")
    values = array.array(code)
    if values.itemsize != int(size):
        raise ConfigError(f"{where}: dtype {descr!r} has no {size}-byte array type on this platform")
    nbytes = shape[0] * values.itemsize
    if len(buf) < nbytes:
        raise ConfigError(f"{where}: {len(buf)} bytes of data for {shape[0]} labels")
    values.frombytes(buf[:nbytes])
    if values.itemsize > 1 and {"<": "little", ">": "big"}.get(order, sys.byteorder) != sys.byteorder:
        values.byteswap()
    return [int(v) for v in values]


def label_histogram(path: str | Path) -> tuple[int, tuple[int, ...]]:
    """(sample count, count of each label 0..max): np.bincount of the shard's `y`."""
    labels = read_labels(path)
    if not labels:
        return 0, ()
    if min(labels) < 0:
        raise ConfigError(f"{path}: y has a negative label ({min(labels)})")
    counts = [0] * (max(labels) + 1)
    for label in labels:
        counts[label] += 1
    return len(labels), tuple(counts)
