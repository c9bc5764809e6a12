"""The label store under an output directory: the part files (SCHEMA), reading them back, the ids already labelled,
writing a part atomically, and the options a resumption must keep (labelling.json)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dwjax.errors import UserError
from dwjax.pseudo_label.options import _OPTION_DEFAULTS, LabelOptions

PART_GLOB = "labels-*-of-*-part*.parquet"
PART_RE = re.compile(r"^labels-(\d{5})-of-(\d{5})-part(\d{5})\.parquet$")
OPTIONS_FILE = "labelling.json"
SUMMARY_FILE = "summary.json"


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
#: columns `summarise` reads (not the audio bytes)
SUMMARY_COLUMNS = ("dataset", "id", "status", "duration_s", "reference", "reference_encoding_errors", "wer", "text",
                   "members", "language", "task", "language_source")


def part_files(output: str | os.PathLike) -> list[Path]:
    """The committed part files under `output`, sorted by name (temporary files are not parts)."""
    directory = Path(output)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PART_RE.match(p.name) and p.is_file())


def read_labels(output: str | os.PathLike, columns: Optional[Sequence[str]] = None):
    """Every committed row under `output` as one pyarrow Table (empty, with SCHEMA, when there is none)."""
    schema = SCHEMA
    tables = []
    for path in part_files(output):
        try:
            tables.append(pq.read_table(path, columns=list(columns) if columns else None, schema=schema))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: unreadable part file ({e}); delete it to relabel its rows") from None
    if not tables:
        schema = pa.schema([schema.field(c) for c in columns]) if columns else schema
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


def _next_part_index(output: Path, process: int, n_processes: int) -> int:
    taken = [int(m.group(3)) for p in part_files(output) if (m := PART_RE.match(p.name))
             and int(m.group(1)) == process and int(m.group(2)) == n_processes]
    return max(taken, default=-1) + 1


def _write_part(output: Path, process: int, n_processes: int, index: int, rows: list[dict]) -> Path:
    name = f"labels-{process:05d}-of-{n_processes:05d}-part{index:05d}.parquet"
    final = output / name
    tmp = output / f".{name}.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def _check_options(output: Path, opts: LabelOptions) -> Optional[dict]:
    """The options of an earlier run in `output`, refusing a resumption with different ones."""
    path = output / OPTIONS_FILE
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); delete it only if the labels were made with the same options")
    diff = [f"{k}: {old.get(k, _OPTION_DEFAULTS.get(k))!r} -> {v!r}" for k, v in opts.fixed().items()
            if old.get(k, _OPTION_DEFAULTS.get(k)) != v]
    if diff:
        raise UserError(f"{output} holds labels made with other options ({'; '.join(diff)}); "
                        "use a new --output directory or the same options")
    return old
