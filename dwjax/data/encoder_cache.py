"""The frozen teacher encoder's output on disk: computed once per training row (a packed window, or a clip) and
reused every epoch (`train.encoder_cache: DIR`, `train.encoder_cache_dtype: float16 | bfloat16`).

Layout of DIR:
    cache.json     {"version", "teacher" (fingerprint), "dtype", "n_audio_ctx", "d_model",
                    "rows": {key: {"index", "audio" (fingerprint)}}}
    encoder.bin    rows x n_audio_ctx x d_model values of `dtype` (2 bytes each), row `index` at index * row bytes
    filled.bin     one byte per row: 1 once its encoder output is written (a fill interrupted by a kill resumes)

Keys. A row's key is `dataset/id` of its label (`LabelledSet.key`); its audio fingerprint is the sha256 of
(path, size, mtime_ns) of its clip (of its bytes for audio held in the label file), and for a packed window of each
member (path, size, mtime_ns, offset_s, duration_s; the sha256 of its bytes instead of the path, size and
mtime for a member held as bytes). The teacher fingerprint is the sha256 of the teacher
encoder's parameters (every array's path, dtype, shape and bytes), its n_mels and the compute dtype: a cache
serves exactly one encoder.

Refused, with one line (a UserError), unless `train.encoder_cache_rebuild: true`: a cache made for another teacher,
dtype or shape (rebuild: emptied and filled again), and rows whose audio fingerprint changed (rebuild: those rows
are computed again). Rows the cache does not hold yet (new labels) are added and filled without asking.

Filling. Before training, the rows not yet filled are computed in global batches (train.per_device_batch_size x
devices), each process computing its rows of each batch ([p * B/P, (p+1) * B/P)) on the mesh and writing them; the
size (rows x n_audio_ctx x d_model x 2 bytes) is printed before anything is written. Training then reads each
batch's rows from the file (no audio decoded, no encoder run). It serves the teacher's encoder only: a student
whose encoder differs from the teacher's (`dwjax.train_step.shares_encoder` false) would still need the audio, so
the cache is refused for it (dwjax/distill.py). Train with the cache for more than one epoch: the first pass
costs what the first epoch's encoder would.
"""
from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import os
from pathlib import Path
import sys
from typing import Callable, Optional, Sequence

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from dwjax.errors import UserError

META, DATA, FILLED = "cache.json", "encoder.bin", "filled.bin"
VERSION = 1
DTYPES = ("float16", "bfloat16")


def numpy_dtype(name: str):
    if name == "float16":
        return np.dtype(np.float16)
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    raise UserError(f"train.encoder_cache_dtype must be one of {', '.join(DTYPES)}, got {name!r}")


def teacher_fingerprint(encoder_params, n_mels: int, compute_dtype: str) -> str:
    """sha256 over the teacher encoder's parameters (path, dtype, shape, bytes), n_mels and the compute dtype."""
    h = hashlib.sha256(f"n_mels={n_mels};dtype={compute_dtype}".encode())
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(encoder_params)[0],
                          key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = np.ascontiguousarray(np.asarray(x))
        h.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape}".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def _file_id(path: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [os.path.abspath(path), None, None]
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def audio_fingerprint(s, i: int) -> str:
    """Row i of LabelledSet s: sha256 of what its audio is made of (module docstring)."""
    h = hashlib.sha256()
    if s.members[i] is None:
        src = s.audio[i]
        if isinstance(src, bytes):
            h.update(b"bytes:" + hashlib.sha256(src).digest())
        else:
            h.update(json.dumps(["clip", _file_id(str(src))]).encode())
    else:
        held = (s.member_bytes[i] if s.member_bytes else None) or [None] * len(s.members[i])
        h.update(json.dumps([[*(["bytes", hashlib.sha256(b).hexdigest()] if b else _file_id(m["audio"])),
                              float(m["offset_s"]), float(m["duration_s"])]
                             for m, b in zip(s.members[i], held)]).encode())
    return h.hexdigest()


def _rebuild_hint(path) -> str:
    return f"set train.encoder_cache_rebuild=true to rebuild it, or choose another train.encoder_cache than {path}"


class EncoderCache:
    """Rows of `sets` -> their cached encoder output (module docstring). Open with `open_cache`."""

    def __init__(self, path: Path, meta: dict, sets: Sequence, index: list[list[int]], dtype):
        self.path, self.meta, self.sets, self.index, self.dtype = path, meta, list(sets), index, dtype
        self.shape = (int(meta["n_audio_ctx"]), int(meta["d_model"]))
        n = max(len(meta["rows"]), 1)
        self.data = np.memmap(path / DATA, dtype=dtype, mode="r+", shape=(n,) + self.shape)
        self.filled = np.memmap(path / FILLED, dtype=np.uint8, mode="r+", shape=(n,))
        self.todo = self.missing()          # read once, before any process writes (open_cache syncs around it)

    @property
    def row_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def missing(self) -> list[tuple[int, int]]:
        """(set, row) of every row whose encoder output is not written yet, in set then row order."""
        return [(d, i) for d, idx in enumerate(self.index) for i, k in enumerate(idx) if not self.filled[k]]

    def read(self, rows: Sequence[tuple[int, int]]) -> np.ndarray:
        """(len(rows), n_audio_ctx, d_model) array of the cache dtype; every row must be filled."""
        ks = [self.index[d][i] for d, i in rows]
        if not all(self.filled[k] for k in ks):
            bad = next((d, i) for (d, i), k in zip(rows, ks) if not self.filled[k])
            raise UserError(f"encoder cache {self.path}: row {self.sets[bad[0]].key(bad[1])} was never filled")
        return np.stack([np.asarray(self.data[k]) for k in ks])

    def write(self, rows: Sequence[tuple[int, int]], values: np.ndarray) -> None:
        for (d, i), v in zip(rows, values):
            k = self.index[d][i]
            self.data[k] = np.asarray(v).astype(self.dtype)
        self.data.flush()
        for d, i in rows:
            self.filled[self.index[d][i]] = 1
        self.filled.flush()

    def fill(self, compute: Callable, global_batch: int, process_index: int = 0, process_count: int = 1,
             log: Callable[[str], None] = print, progress: bool = True,
             load: Optional[Callable[[list[tuple[int, int]]], object]] = None) -> int:
        """Computes every missing row: global batches of `global_batch` rows (the last one padded by repeating its
        first row), this process's slice of each through `compute(rows) -> (local rows, ctx, d)` (a collective on
        the mesh: every process calls it for every batch), written here. With `load`, `compute` takes
        `load(rows)` instead of the rows, and the next batch's `load` runs in a thread while this one computes
        (reading audio overlaps the encoder). Returns the number of rows computed."""
        todo = self.todo
        total_rows = len(self.meta["rows"])
        size = total_rows * self.row_bytes
        log(f"encoder cache {self.path}: {total_rows} rows x {self.shape[0]} x {self.shape[1]} x "
            f"{self.dtype.itemsize} bytes ({self.meta['dtype']}) = {size / 2**30:.3f} GiB on disk; "
            f"{len(todo)} rows to compute now, {total_rows - len(todo)} already there")
        if not todo:
            return 0
        local = global_batch // process_count
        lo = process_index * local
        batches = []                                   # (this process's rows, real rows in the global batch)
        for start in range(0, len(todo), global_batch):
            chunk = todo[start: start + global_batch]
            real = len(chunk)
            chunk = chunk + [chunk[0]] * (global_batch - real)
            batches.append((chunk[lo: lo + local], real))
        bar = None
        if progress and process_index == 0:
            bar = tqdm(total=len(todo), desc="encoder cache", unit="row", file=sys.stderr, dynamic_ncols=True)
        with futures.ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(load, batches[0][0]) if load is not None else None
            for k, (mine, real) in enumerate(batches):
                if pending is None:
                    values = compute(mine)
                else:
                    inputs = pending.result()
                    if k + 1 < len(batches):
                        pending = ahead.submit(load, batches[k + 1][0])
                    values = compute(inputs)
                keep = [(r, v) for j, (r, v) in enumerate(zip(mine, values)) if lo + j < real]
                if keep:
                    self.write([r for r, _ in keep], np.stack([v for _, v in keep]))
                if bar is not None:
                    bar.update(real)
        if bar is not None:
            bar.close()
        self.todo = []
        return len(todo)


def open_cache(path: str | os.PathLike, sets: Sequence, teacher: str, dtype: str, n_audio_ctx: int, d_model: int,
               rebuild: bool = False, main_process: bool = True, sync: Optional[Callable[[], None]] = None,
               log: Callable[[str], None] = print) -> EncoderCache:
    """Opens (creating it if needed) the cache at `path` for the rows of `sets`; refuses a cache that does not
    match (module docstring) with one UserError unless `rebuild`. Process 0 (`main_process`) writes the files;
    `sync` (every process) waits for it; every process derives the same row layout."""
    path = Path(path)
    np_dtype = numpy_dtype(dtype)
    fps = [[audio_fingerprint(s, i) for i in range(len(s))] for s in sets]
    keys = [[s.key(i) for i in range(len(s))] for s in sets]
    want = {"version": VERSION, "teacher": teacher, "dtype": dtype, "n_audio_ctx": int(n_audio_ctx),
            "d_model": int(d_model)}
    meta = None
    if (path / META).exists():
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"encoder cache {path}: {META} unreadable ({e}); {_rebuild_hint(path)}") from None
    reset, changed = False, []
    if meta is not None:
        if meta.get("teacher") != teacher:
            if not rebuild:
                raise UserError(f"encoder cache {path} was made for another teacher (encoder fingerprint "
                                f"{str(meta.get('teacher'))[:12]}, this teacher's {teacher[:12]}): "
                                f"{_rebuild_hint(path)}")
            reset = True
        else:
            other = [k for k in ("version", "dtype", "n_audio_ctx", "d_model") if meta.get(k) != want[k]]
            if other:
                if not rebuild:
                    what = ", ".join(f"{k} {meta.get(k)} (now {want[k]})" for k in other)
                    raise UserError(f"encoder cache {path} was made with {what}: {_rebuild_hint(path)}")
                reset = True
        if not reset:
            rows = meta.get("rows", {})
            changed = [k for ks, fs in zip(keys, fps) for k, f in zip(ks, fs) if k in rows and rows[k]["audio"] != f]
            if changed and not rebuild:
                raise UserError(f"encoder cache {path}: the audio of {len(changed)} row(s) changed since it was "
                                f"written (first: {changed[0]}): {_rebuild_hint(path)}")
    if meta is None or reset:
        meta = dict(want, rows={})
        reset = True
    rows = meta["rows"]
    for ks, fs, s in zip(keys, fps, sets):
        for k, f, i in zip(ks, fs, range(len(s))):
            if k not in rows:
                rows[k] = {"index": len(rows), "audio": f}
            else:
                rows[k]["audio"] = f
    n = max(len(rows), 1)
    row_bytes = int(n_audio_ctx) * int(d_model) * np_dtype.itemsize
    if main_process:
        path.mkdir(parents=True, exist_ok=True)
        mode = "wb" if reset else "ab"
        for name, width in ((DATA, row_bytes), (FILLED, 1)):
            with open(path / name, mode):
                pass
            if os.path.getsize(path / name) < n * width or reset:
                os.truncate(path / name, n * width)
        if changed:
            filled = np.memmap(path / FILLED, dtype=np.uint8, mode="r+", shape=(n,))
            for k in changed:
                filled[rows[k]["index"]] = 0
            filled.flush()
            del filled
        tmp = path / f".{META}.tmp"
        tmp.write_text(json.dumps(meta) + "\n", encoding="utf-8")
        os.replace(tmp, path / META)
    if sync is not None:
        sync()
    index = [[rows[k]["index"] for k in ks] for ks in keys]
    if changed:
        log(f"encoder cache {path}: rebuilding {len(changed)} row(s) whose audio changed")
    cache = EncoderCache(path, meta, sets, index, np_dtype)
    if sync is not None:
        sync()                              # every process has read what is missing before anyone writes
    return cache
