"""Read and write CTranslate2 `model.bin` files (the format faster-whisper loads).

Layout (little endian): u32 binary version, str spec name, u32 spec revision, u32 n variables, then per
variable: str name, u8 rank, u32 dims[rank], u8 dtype id, u32 n bytes, raw data; then u32 n aliases and
(str alias, str target) pairs. A str is u16 length (including a trailing NUL) + bytes.
"""
from __future__ import annotations

import io
import struct

import numpy as np

from dwjax.errors import WeightsError

# CTranslate2's DataType enum
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
              np.dtype(np.float16): 4}
BINARY_VERSION = 6


def _read_str(f) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n)[:-1].decode("utf-8")


def _write_str(f, s: str) -> None:
    b = s.encode("utf-8") + b"\0"
    f.write(struct.pack("<H", len(b)))
    f.write(b)


def read_model_bin(source) -> tuple[str, dict[str, np.ndarray]]:
    """Returns (spec name, {variable name: array}) from a path or a binary file object; aliases resolved."""
    f = open(source, "rb") if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else source
    try:
        (version,) = struct.unpack("<I", f.read(4))
        if version > BINARY_VERSION or version < 3:
            raise WeightsError(f"{getattr(f, 'name', 'model.bin')}: unsupported CTranslate2 binary version {version}")
        spec = _read_str(f)
        f.read(4)  # spec revision
        (n,) = struct.unpack("<I", f.read(4))
        out: dict[str, np.ndarray] = {}
        for _ in range(n):
            name = _read_str(f)
            (rank,) = struct.unpack("<B", f.read(1))
            shape = struct.unpack(f"<{rank}I", f.read(4 * rank))
            (dtype_id,) = struct.unpack("<B", f.read(1))
            (nbytes,) = struct.unpack("<I", f.read(4))
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise WeightsError(f"{getattr(f, 'name', 'model.bin')}: truncated at variable {name!r}")
            dt = _DTYPES[dtype_id]
            if dt == "bfloat16":
                arr = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(data, dt)
            out[name] = arr.reshape(shape)
        (n_alias,) = struct.unpack("<I", f.read(4)) if version >= 5 else (0,)
        for _ in range(n_alias):
            alias, target = _read_str(f), _read_str(f)
            out[alias] = out[target]
        return spec, out
    except struct.error as e:
        raise WeightsError(f"{getattr(f, 'name', 'model.bin')}: truncated or not a CTranslate2 model ({e})") from None
    finally:
        if f is not source:
            f.close()


def write_model_bin(path, spec: str, variables: dict[str, np.ndarray], revision: int = 3,
                    aliases: dict[str, str] | None = None) -> None:
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
    data = b"".join(open(p, "rb").read() for p in paths)
    return read_model_bin(io.BytesIO(data))
