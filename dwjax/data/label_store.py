"""The label store: the part files `dwjax pseudo-label` writes under its output directory (SCHEMA), written
atomically, and the one reader of label parquet files: `read_part` (one file, as training reads each file of
data.train) and `read_labels` (every committed part of an output directory), plus the ids already labelled.

A file written by an older version, which lacks some of SCHEMA's columns, reads with those columns null; columns
outside SCHEMA are left out. An unreadable file (truncated, corrupt, not parquet) is a one-line UserError naming
it."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dwjax.errors import UserError

PART_GLOB = "labels-*-of-*-part*.parquet"
PART_RE = re.compile(r"^labels-(\d{5})-of-(\d{5})-part(\d{5})\.parquet$")


SCHEMA = pa.schema([
    ("id", pa.string()),
    ("dataset", pa.string()),
    ("audio", pa.string()),                  # the audio path (null for audio held as bytes: audio_bytes)
    ("duration_s", pa.float64()),
    ("text", pa.string()),                   # the teacher's label
    ("token_ids", pa.list_(pa.int32())),
    ("language", pa.string()),
    ("avg_logprob", pa.float64()),
    ("compression_ratio", pa.float64()),
    ("no_speech_prob", pa.float64()),
    ("timestamps", pa.string()),             # JSON list of {"start", "end", "text"} (with --timestamps)
    ("reference", pa.string()),
    ("reference_encoding_errors", pa.bool_()),
    ("wer", pa.float64()),
    ("status", pa.string()),                 # "ok", "no speech: <why>", or "<kind>: <detail>" (FAILURE_KINDS)
    ("members", pa.string()),                # packed windows: JSON list of {"id", "offset_s", "duration_s", "audio"}
    ("source", pa.string()),                 # packed windows: the members' speaker / source key (null if unknown)
    ("task", pa.string()),                   # "transcribe" or "translate" (null in labels of older versions)
    ("language_probability", pa.float64()),  # the teacher's probability of `language` (null: not measured)
    ("language_source", pa.string()),        # "forced", "manifest" or "detected"
    ("metric", pa.string()),                 # what `wer` measures: "wer" or "cer" (dwjax.text.languages)
    ("audio_bytes", pa.binary()),            # a clip held as bytes (a datasets Audio column): its encoded file
    ("member_audio_bytes", pa.list_(pa.binary())),  # packed windows of such clips: each member's file, in order
])


def part_files(output: str | os.PathLike) -> list[Path]:
    """The committed part files under `output`, sorted by name (temporary files are not parts)."""
    directory = Path(output)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PART_RE.match(p.name) and p.is_file())


def read_part(path: str | os.PathLike, columns: Optional[Sequence[str]] = None, required: Sequence[str] = (),
              hint: str = "`dwjax pseudo-label` writes them") -> pa.Table:
    """One label file as a Table with SCHEMA's columns (or `columns` of them). UserError naming the file when it
    cannot be read, or when it lacks one of the `required` columns (then `hint` follows: what to do instead)."""
    try:
        have = pq.read_schema(path).names
        table = pq.read_table(path, columns=list(columns) if columns else None, schema=SCHEMA)
    except (pa.ArrowException, OSError, ValueError) as e:
        detail = " ".join(str(e).split())
        raise UserError(f"pseudo-label file {path} cannot be read (corrupt or truncated? {detail[:200]}): "
                        f"remove it and rerun `dwjax pseudo-label` on the same output to relabel its rows") from None
    missing = [c for c in required if c not in have]
    if missing:
        raise UserError(f"{path} is not a pseudo-label file (no column {', '.join(missing)}): {hint}")
    return table


def read_labels(output: str | os.PathLike, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Every committed row under `output` as one pyarrow Table (empty, with SCHEMA, when there is none)."""
    tables = [read_part(path, columns) for path in part_files(output)]
    if not tables:
        schema = pa.schema([SCHEMA.field(c) for c in columns]) if columns else SCHEMA
        return schema.empty_table()
    return pa.concat_tables(tables)


def completed_keys(output: str | os.PathLike) -> set[tuple[str, str]]:
    """(dataset, id) of every committed row under `output` (whatever its status); for a packed window, the
    (dataset, id) of each of its member clips (not the window's own id)."""
    table = read_labels(output, columns=["dataset", "id", "members"])
    done = set()
    for ds, id_, members in zip(table.column("dataset").to_pylist(), table.column("id").to_pylist(),
                                table.column("members").to_pylist()):
        if members:
            done.update((ds, m["id"]) for m in json.loads(members))
        else:
            done.add((ds, id_))
    return done


def next_part_index(output: Path, process: int, n_processes: int) -> int:
    """The index of the next part file process `process` (of `n_processes`) writes under `output`."""
    taken = [int(m.group(3)) for p in part_files(output) if (m := PART_RE.match(p.name))
             and int(m.group(1)) == process and int(m.group(2)) == n_processes]
    return max(taken, default=-1) + 1


def write_part(output: Path, process: int, n_processes: int, index: int, rows: list[dict]) -> Path:
    """`rows` as part `index` of process `process` under `output`: written to a temporary file, synced, renamed."""
    name = f"labels-{process:05d}-of-{n_processes:05d}-part{index:05d}.parquet"
    final = output / name
    tmp = output / f".{name}.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final
