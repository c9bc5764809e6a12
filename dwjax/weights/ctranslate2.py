"""Read and write CTranslate2 `model.bin` files (the format faster-whisper loads).

Layout (little endian): u32 binary version, str spec name, u32 spec revision, u32 n variables, then per
variable: str name, u8 rank, u32 dims[rank], u8 dtype id, u32 n bytes, raw data; then u32 n aliases and
(str alias, str target) pairs. A str is u16 length (including a trailing NUL) + bytes.
"""
from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

from dwjax.errors import WeightsError

# CTranslate2's DataType enum
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
              np.dtype(np.float16): 4}
BINARY_VERSION = 6


class _Truncated(Exception):
    pass


def _read(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Truncated
    return data


def _unpack(f, fmt: str) -> tuple:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))


def _read_str(f) -> str:
    (n,) = _unpack(f, "<H")
    return _read(f, n)[:-1].decode("utf-8")


def _write_str(f, s: str) -> None:
    b = s.encode("utf-8") + b"\0"
    f.write(struct.pack("<H", len(b)))
    f.write(b)


def read_model_bin(source) -> tuple[str, dict[str, np.ndarray]]:
    """Returns (spec name, {variable name: array}) from a path or a binary file object; aliases resolved."""
    f = open(source, "rb") if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else source
    where = getattr(f, "name", "model.bin")
    name = None
    try:
        (version,) = _unpack(f, "<I")
        if version > BINARY_VERSION or version < 3:
            raise WeightsError(f"{where}: not a CTranslate2 model (binary version {version}; dwjax reads 3 to "
                               f"{BINARY_VERSION})")
        spec = _read_str(f)
        _read(f, 4)  # spec revision
        (n,) = _unpack(f, "<I")
        out: dict[str, np.ndarray] = {}
        for _ in range(n):
            name = _read_str(f)
            (rank,) = _unpack(f, "<B")
            shape = _unpack(f, f"<{rank}I")
            (dtype_id,) = _unpack(f, "<B")
            (nbytes,) = _unpack(f, "<I")
            data = _read(f, nbytes)
            if dtype_id not in _DTYPES:
                raise WeightsError(f"{where}: variable {name!r} has unknown dtype id {dtype_id}: corrupt or not a "
                                   "CTranslate2 model")
            dt = _DTYPES[dtype_id]
            if dt == "bfloat16":
                arr = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(data, dt)
            out[name] = arr.reshape(shape)
        name = None
        (n_alias,) = _unpack(f, "<I") if version >= 5 else (0,)
        for _ in range(n_alias):
            alias, target = _read_str(f), _read_str(f)
            out[alias] = out[target]
        return spec, out
    except _Truncated:
        at = f" at variable {name!r}" if name is not None else ""
        raise WeightsError(f"{where}: truncated{at}: not a complete CTranslate2 model") from None
    except (struct.error, ValueError, KeyError) as e:       # bad lengths, shapes or alias targets
        raise WeightsError(f"{where}: corrupt or not a CTranslate2 model ({type(e).__name__}: {e})") from None
    finally:
        if f is not source:
            f.close()


def write_model_bin(path, spec: str, variables: dict[str, np.ndarray], revision: int = 3,
                    aliases: dict[str, str] | None = None) -> None:
    """Write a model.bin (mode from the user's umask, as open() gives)."""
    aliases = aliases or {}
    with open(path, "wb") as f:
        f.write(struct.pack("<I", BINARY_VERSION))
        _write_str(f, spec)
        f.write(struct.pack("<I", revision))
        f.write(struct.pack("<I", len(variables)))
        for name, arr in variables.items():
            arr = np.asarray(arr, order="C")          # keeps 0-d scalars 0-d
            _write_str(f, name)
            f.write(struct.pack("<B", arr.ndim))
            f.write(struct.pack(f"<{arr.ndim}I", *arr.shape))
            f.write(struct.pack("<B", _DTYPE_IDS[arr.dtype]))
            f.write(struct.pack("<I", arr.nbytes))
            f.write(arr.tobytes())
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            _write_str(f, alias)
            _write_str(f, target)


def read_split(paths) -> tuple[str, dict[str, np.ndarray]]:
    """A model.bin split into several files (PyPI size limits), read as one stream."""
    data = b"".join(Path(p).read_bytes() for p in paths)
    stream = io.BytesIO(data)
    stream.name = " + ".join(str(p) for p in paths)
    return read_model_bin(stream)
