"""Dataset manifests: one reader for every way a dataset reaches us, one writer (JSONL).

    read_dataset(spec) -> list[Example]
    write_manifest(path, rows) -> Path

`spec` is a path, optionally prefixed with a dataset name: `name=path`. The path may be
  * a JSONL, CSV or TSV manifest with columns `id`, `audio` (a path, relative to the manifest file
    unless absolute), and optionally `text`, `language` (a Whisper code or name), `task` ("transcribe", or
    "translate" when `text` is an English translation of the speech), `duration_s`, `speaker` (a speaker / source
    key: packing never puts two speakers in one window);
  * a directory written by `datasets.Dataset.save_to_disk` (read with pyarrow, so nothing is decoded
    and neither `datasets` nor torch is needed);
  * a parquet or arrow file, or a directory of them. The audio column is either the struct
    `{"bytes", "path"}` that `datasets.Audio(decode=False)` stores, raw bytes, or a plain path
    column. Without an `id` column, ids are `<dataset>-<row number>`.
A few common alternative column names are accepted (`path`/`file`/`audio_filepath` for audio,
`sentence`/`transcription`/`transcript` for text, `lang`/`locale` for language, `key` for id,
`speaker_id`/`source`/`client_id` for speaker).
Bytes that are not UTF-8 in a text manifest are decoded with U+FFFD replacements, the example is
flagged with `encoding_errors=True`, and a warning says how many rows were affected.
"""
from __future__ import annotations

import codecs
import csv
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from dwjax.errors import UserError

__all__ = ["Example", "read_dataset", "write_manifest", "parse_spec"]

ID_COLUMNS = ("id", "key", "utt_id", "segment_id")
AUDIO_COLUMNS = ("audio", "path", "file", "audio_filepath", "audio_path")
TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text")
LANGUAGE_COLUMNS = ("language", "lang", "locale")
TASK_COLUMNS = ("task",)
TASKS = ("transcribe", "translate")
DURATION_COLUMNS = ("duration_s", "duration")
SPEAKER_COLUMNS = ("speaker", "speaker_id", "source", "client_id")
TEXT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
TABLE_SUFFIXES = (".parquet", ".arrow")


@dataclass(frozen=True)
class Example:
    """One utterance. Exactly one of `audio_path` / `audio_bytes` is set."""
    id: str
    audio_path: str | None = None
    audio_bytes: bytes | None = field(default=None, repr=False)
    text: str | None = None
    language: str | None = None
    dataset: str = ""
    duration_s: float | None = None
    encoding_errors: bool = False  # the row held bytes that were not UTF-8 (replaced by U+FFFD)
    speaker: str | None = None     # speaker / source key, when the manifest has one
    task: str | None = None        # "transcribe" / "translate" when the manifest says; None: the run's task


def parse_spec(spec: str | os.PathLike) -> tuple[str, Path]:
    """'name=path' -> (name, path); a bare path is named after its file stem or directory name.
    A path that exists is never split, so paths containing '=' keep working."""
    text = os.fspath(spec)
    if not text:
        raise UserError("empty dataset spec")
    name = None
    if not os.path.exists(text) and "=" in text:
        name, _, text = text.partition("=")
        if not name or not text:
            raise UserError(f"bad dataset spec {os.fspath(spec)!r}; expected PATH or NAME=PATH")
    path = Path(text)
    if name is None:
        name = path.name if path.is_dir() else path.stem
    return name, path


def read_dataset(spec: str | os.PathLike) -> list[Example]:
    """Read every example of a manifest / saved dataset / parquet or arrow file (see module docstring)."""
    name, path = parse_spec(spec)
    if not path.exists():
        raise UserError(f"no such manifest or dataset: {path}")
    if path.is_dir():
        examples = _read_directory(path, name)
    else:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            kind = TEXT_SUFFIXES[suffix]
            examples = _read_jsonl(path, name) if kind == "jsonl" else _read_delimited(path, name, kind)
        elif suffix in TABLE_SUFFIXES:
            examples = _read_tables([path], path.parent, name)
        else:
            raise UserError(f"{path}: unknown manifest format {suffix or '(no suffix)'!r}; "
                            "use .jsonl, .csv, .tsv, .parquet, .arrow or a save_to_disk directory")
    _check_unique(examples, path)
    bad = sum(e.encoding_errors for e in examples)
    if bad:
        warnings.warn(f"{path}: {bad} row(s) contain bytes that are not UTF-8; decoded with replacement characters",
                      stacklevel=2)
    return examples


def write_manifest(path: str | os.PathLike, rows: Iterable[Mapping[str, Any] | Example]) -> Path:
    """Write rows as JSONL (UTF-8, one object a line), atomically. `Example`s are written with their
    audio path relative to the manifest; examples holding audio bytes cannot go in a JSONL manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        if isinstance(row, Example):
            if row.audio_path is None:
                raise UserError(f"example {row.id!r} holds audio bytes, which a JSONL manifest cannot store")
            audio = os.path.relpath(os.path.abspath(row.audio_path), os.path.abspath(path.parent))
            row = {"id": row.id, "audio": audio, "text": row.text, "language": row.language, "task": row.task,
                   "duration_s": row.duration_s, "speaker": row.speaker}
            row = {k: v for k, v in row.items() if v is not None}
        lines.append(json.dumps(dict(row), ensure_ascii=False))
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(partial, path)
    return path


# ---------------------------------------------------------------- text manifests

def _decode_lines(path: Path) -> tuple[list[str], set[int]]:
    """The file's lines (endings kept) and the 1-based numbers of lines that were not valid UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    lines, bad = [], set()
    for number, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("utf-8", errors="replace"))
            bad.add(number)
    return lines, bad


def _first_key(mapping: Mapping[str, Any], candidates: tuple[str, ...]) -> str | None:
    return next((key for key in candidates if key in mapping), None)


def _resolve(audio: str, base: Path) -> str:
    return audio if os.path.isabs(audio) else os.path.normpath(os.path.join(base, audio))


def _as_float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _as_optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _as_speaker(value: Any) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _as_task(value: Any, where: str) -> str | None:
    if value is None or str(value).strip() == "":
        return None
    task = str(value).strip().lower()
    if task not in TASKS:
        raise UserError(f"{where}: task {value!r} is neither transcribe nor translate")
    return task


def _example_from_row(row: Mapping[str, Any], where: str, base: Path, name: str, bad: bool,
                      keys: dict[str, str | None]) -> Example:
    id_ = row.get(keys["id"]) if keys["id"] else None
    audio = row.get(keys["audio"]) if keys["audio"] else None
    if id_ is None or str(id_).strip() == "":
        raise UserError(f"{where}: empty 'id'")
    if audio is None or str(audio).strip() == "":
        raise UserError(f"{where}: empty 'audio'")
    text = row.get(keys["text"]) if keys["text"] else None
    language = row.get(keys["language"]) if keys["language"] else None
    speaker = row.get(keys["speaker"]) if keys["speaker"] else None
    task = _as_task(row.get(keys["task"]), where) if keys["task"] else None
    return Example(
        id=str(id_).strip(),
        audio_path=_resolve(str(audio).strip(), base),
        text=_as_optional_str(text),
        language=_as_optional_str(language) or None,
        dataset=name,
        duration_s=_as_float(row.get(keys["duration"])) if keys["duration"] else None,
        encoding_errors=bad,
        speaker=_as_speaker(speaker),
        task=task,
    )


def _column_keys(columns: Iterable[str], path: Path, require_id: bool = True) -> dict[str, str | None]:
    columns = list(columns)
    present = dict.fromkeys(columns)
    keys = {
        "id": _first_key(present, ID_COLUMNS),
        "audio": _first_key(present, AUDIO_COLUMNS),
        "text": _first_key(present, TEXT_COLUMNS),
        "language": _first_key(present, LANGUAGE_COLUMNS),
        "task": _first_key(present, TASK_COLUMNS),
        "duration": _first_key(present, DURATION_COLUMNS),
        "speaker": _first_key(present, SPEAKER_COLUMNS),
    }
    for required in ("id", "audio") if require_id else ("audio",):
        if keys[required] is None:
            raise UserError(f"{path}: no {required!r} column (columns: {', '.join(map(str, columns)) or 'none'})")
    return keys


def _read_jsonl(path: Path, name: str) -> list[Example]:
    lines, bad = _decode_lines(path)
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        keys = _column_keys(row, where)
        examples.append(_example_from_row(row, where, path.parent, name, number in bad, keys))
    if not examples:
        raise UserError(f"{path}: the manifest is empty")
    return examples


def _read_delimited(path: Path, name: str, kind: str) -> list[Example]:
    lines, bad = _decode_lines(path)
    reader = csv.DictReader(lines, delimiter="," if kind == "csv" else "\t", strict=True)
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num}: malformed {kind.upper()} header ({e})") from None
    if not header:
        raise UserError(f"{path}: the manifest is empty")
    reader.fieldnames = [column.strip() for column in header]
    keys = _column_keys(reader.fieldnames, path)
    examples, previous = [], reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise UserError(f"{path} line {reader.line_num}: malformed {kind.upper()} ({e})") from None
        first, last = previous + 1, reader.line_num
        previous = last
        where = f"{path} line {first}"
        if None in row:
            raise UserError(f"{where}: {len(header) + len(row[None])} fields but the header has {len(header)}")
        if any(value is None for value in row.values()):
            raise UserError(f"{where}: fewer fields than the header's {len(header)}")
        row_bad = any(n in bad for n in range(first, last + 1))
        examples.append(_example_from_row(row, where, path.parent, name, row_bad, keys))
    if not examples:
        raise UserError(f"{path}: the manifest has a header but no rows")
    return examples


# ---------------------------------------------------------------- arrow / parquet / save_to_disk

def _read_directory(path: Path, name: str) -> list[Example]:
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
        raise UserError(f"{path} holds several splits ({', '.join(splits) or 'none found'}); "
                        f"name one, e.g. {path / (splits[0] if splits else 'train')}")
    state = path / "state.json"
    if state.exists():
        try:
            files = [path / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{state}: not a datasets save_to_disk state file ({e})") from None
        return _read_tables(files, path, name)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TABLE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{path}: not a dataset directory (no state.json from save_to_disk, "
                        "and no .parquet or .arrow files)")
    return _read_tables(files, path, name)


def _open_table(path: Path):
    if not path.exists():
        raise UserError(f"{path}: missing data file")
    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all()  # what save_to_disk writes
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read as {path.suffix.lstrip('.')} ({e})") from None


def _audio_from_cell(cell: Any, base: Path, where: str) -> tuple[str | None, bytes | None]:
    if isinstance(cell, dict):  # datasets.Audio(decode=False): {"bytes": ..., "path": ...}
        if cell.get("bytes"):
            return None, bytes(cell["bytes"])
        if cell.get("path"):
            return _resolve(str(cell["path"]), base), None
        raise UserError(f"{where}: audio has neither bytes nor a path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        if len(cell) == 0:
            raise UserError(f"{where}: empty audio bytes")
        return None, bytes(cell)
    if isinstance(cell, str) and cell.strip():
        return _resolve(cell.strip(), base), None
    raise UserError(f"{where}: empty 'audio'")


def _read_tables(files: list[Path], base: Path, name: str) -> list[Example]:
    examples: list[Example] = []
    row_number = 0
    for file in files:
        table = _open_table(file)
        keys = _column_keys(table.column_names, file, require_id=False)
        wanted = [k for k in dict.fromkeys(keys.values()) if k is not None]
        for batch in table.select(wanted).to_batches():
            for row in batch.to_pylist():
                where = f"{file} row {row_number}"
                audio_path, audio_bytes = _audio_from_cell(row[keys["audio"]], base, where)
                id_ = row.get(keys["id"]) if keys["id"] else None
                text = row.get(keys["text"]) if keys["text"] else None
                language = row.get(keys["language"]) if keys["language"] else None
                examples.append(Example(
                    id=str(id_) if id_ not in (None, "") else f"{name}-{row_number:08d}",
                    audio_path=audio_path,
                    audio_bytes=audio_bytes,
                    text=_as_optional_str(text),
                    language=_as_optional_str(language) or None,
                    dataset=name,
                    duration_s=_as_float(row.get(keys["duration"])) if keys["duration"] else None,
                    speaker=_as_speaker(row.get(keys["speaker"])) if keys["speaker"] else None,
                    task=_as_task(row.get(keys["task"]), where) if keys["task"] else None,
                ))
                row_number += 1
    if not examples:
        raise UserError(f"{base}: the dataset has no rows")
    return examples


def _check_unique(examples: list[Example], path: Path) -> None:
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise UserError(f"{path}: id {example.id!r} appears more than once")
        seen.add(example.id)
