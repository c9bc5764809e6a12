"""A step directory's integrity record: `dwjax_manifest.json`, the size and CRC-32 of every file, written after all
processes finished writing and before orbax's commit rename, and checked before a restore (orbax/tensorstore do not
notice a truncated or altered data file)."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from dwjax.checkpoint.layout import MANIFEST_NAME
from dwjax.errors import CheckpointError

#: files orbax may rewrite at commit time (after our manifest), so the manifest leaves them out
_UNCHECKED = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST_NAME})


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files are missing, truncated or altered since they were written."""


def _crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _checked_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in _UNCHECKED)


def write_manifest(step_dir: str | os.PathLike) -> Path:
    """Record size and CRC-32 of every file under `step_dir` (except orbax's commit files) in the manifest."""
    step_dir = Path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "crc32": _crc32(p)}
             for p in _checked_files(step_dir)}
    target = step_dir / MANIFEST_NAME
    tmp = step_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, target)
    return target


def verify_step_dir(step_dir: str | os.PathLike, full: bool = True) -> bool:
    """Check a step directory against its manifest; True if checked, False if it has no manifest.

    `full=False` checks presence and sizes only (fast); `full=True` also the CRC-32 of every byte.
    Raises `CheckpointCorruptError` naming the first bad file."""
    step_dir = Path(step_dir)
    manifest = step_dir / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: {manifest} is unreadable ({e})") from None
    for rel, want in sorted(files.items()):
        path = step_dir / rel
        if not path.is_file():
            raise CheckpointCorruptError(f"checkpoint {step_dir} is incomplete: file {path} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "longer than written"
            raise CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: file {path} is {size} bytes, "
                                         f"{want['size']} were written ({what})")
        if full and _crc32(path) != want["crc32"]:
            raise CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: file {path} has changed since it "
                                         f"was written (CRC-32 mismatch)")
    return True
