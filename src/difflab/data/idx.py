"""Reader for the idx format of MNIST and Fashion-MNIST, plain or gzip-compressed.

Layout (big-endian): two zero bytes, one type byte, one byte giving the number of dimensions d,
then d uint32 sizes, then the values in C order.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw


def parse_idx(raw: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode idx bytes into an array of the stored dtype and shape."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{source} is not an idx file: header {raw[:4]!r}; expected 0x00 0x00, a type byte "
            f"in {[hex(k) for k in _IDX_DTYPES]} and the number of dimensions"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{source}: idx header announces shape {shape} of {dtype} ({expected} bytes with the "
            f"header) but the file holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (`.gz` or not, detected from its first bytes)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), source=str(path))


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """`folder/stem` or `folder/stem.gz`, whichever exists first; None when neither does."""
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None
