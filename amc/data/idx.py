"""A small reader for the IDX format (MNIST, Fashion-MNIST), plain or gzipped.

Written here rather than borrowed so that a truncated download or a garbled file fails with a
DataError naming the file and what was wrong, instead of a reshape error deep in numpy.

Layout: two zero bytes, a dtype code, the number of dims; then one big-endian uint32 per dim;
then the values, big-endian, row-major.
"""
from __future__ import annotations

import gzip
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import DataError

#: IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"IDX file {str(path)!r} does not exist") from exc
    except OSError as exc:
        raise DataError(f"cannot read IDX file {str(path)!r}: {exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"IDX file {str(path)!r} is not a valid gzip stream ({exc}); it is probably truncated: "
                "re-install or re-download it"
            ) from exc
    elif path.suffix == ".gz":
        raise DataError(f"IDX file {str(path)!r} is named .gz but is not gzip-compressed")
    return raw


def parse_idx(raw: bytes, name: str = "<bytes>", expected_ndim: Optional[int] = None) -> np.ndarray:
    """Decode IDX bytes into a native-endian numpy array, checking magic, dims and length exactly."""
    if len(raw) < 4:
        raise DataError(f"IDX data {name!r} is {len(raw)} bytes long: too short for the 4-byte magic")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(f"IDX data {name!r} has bad magic {raw[:4].hex()}: expected 0000<dtype><ndim>")
    if code not in IDX_DTYPES:
        raise DataError(
            f"IDX data {name!r} has unknown dtype code 0x{code:02x}; expected one of "
            + ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        )
    if ndim == 0:
        raise DataError(f"IDX data {name!r} declares 0 dimensions")
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(f"IDX data {name!r} has {ndim} dims, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX data {name!r} is truncated inside its header ({len(raw)} < {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - header
    if body != expected:
        kind = "truncated" if body < expected else "followed by trailing bytes"
        raise DataError(
            f"IDX data {name!r} is {kind}: dims {dims} of {dtype.name} need {expected} bytes, "
            f"found {body}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


@lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int, expected_ndim: Optional[int]) -> np.ndarray:
    arr = parse_idx(_read_bytes(Path(path)), name=path, expected_ndim=expected_ndim)
    arr.setflags(write=False)  # shared through the cache: callers must copy before editing
    return arr


def read_idx(path: Union[str, os.PathLike], expected_ndim: Optional[int] = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a read-only numpy array.

    Results are cached on (path, mtime, size), so loading Fashion-MNIST twice in one process
    costs the decompression once; editing the file invalidates the entry.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise DataError(f"IDX file {str(p)!r} does not exist") from exc
    return _read_idx_cached(str(p.resolve()), st.st_mtime_ns, st.st_size, expected_ndim)


def write_idx(path: Union[str, os.PathLike], array: np.ndarray, compress: Optional[bool] = None) -> None:
    """Write ``array`` as IDX (gzipped when ``compress`` or the name ends in ``.gz``); for tests/tools."""
    p = Path(path)
    arr = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = arr.dtype.newbyteorder("=")
    if native not in codes:
        raise DataError(f"dtype {arr.dtype} has no IDX code")
    if arr.ndim == 0 or arr.ndim > 255:
        raise DataError(f"IDX needs 1..255 dims, got {arr.ndim}")
    header = bytes([0, 0, codes[native], arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    raw = header + arr.astype(IDX_DTYPES[codes[native]], copy=False).tobytes()
    if compress if compress is not None else p.suffix == ".gz":
        raw = gzip.compress(raw, compresslevel=1)
    from ..export.atomic import atomic_write  # a crash mid-write leaves the old file, never half a new one

    with atomic_write(p, "wb") as f:
        f.write(raw)

