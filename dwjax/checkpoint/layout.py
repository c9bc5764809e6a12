"""A checkpoints directory on disk: the names in a step directory, which steps it holds, and their summaries read
straight from the files (no orbax manager, nothing deleted). The layout is drawn in `dwjax.checkpoint`'s docstring."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

#: item names inside a step directory
STATE_ITEM, DATA_ITEM, META_ITEM = "state", "data_position", "meta"
#: the file (in each step directory) listing every other file's size and CRC-32
MANIFEST_NAME = "dwjax_manifest.json"
#: orbax's suffix of a step directory still being written
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints: `<run.output_dir>/checkpoints`."""
    return Path(output_dir) / "checkpoints"


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    """One step directory as found on disk (see `list_checkpoints`)."""
    step: int
    path: Path
    complete: bool                    # committed (renamed from the tmp directory)
    size_bytes: int
    time: str | None                  # commit time (UTC, ISO 8601), else the time the write started
    metrics: dict | None
    topology: dict | None
    dwjax_version: str | None
    has_manifest: bool


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step_of(name: str) -> int | None:
    """The step a step directory's name stands for (committed or still being written), else None."""
    head = name.split(TMP_SUFFIX)[0]
    return int(head) if head.isdigit() else None


def list_checkpoints(directory: str | os.PathLike) -> list[CheckpointSummary]:
    """Every step directory under `directory` (a checkpoints directory or a run directory holding one),
    committed or not, read straight from disk (no orbax manager, nothing deleted), by step."""
    directory = Path(directory)
    if not any(step_of(p.name) is not None for p in directory.iterdir() if p.is_dir()) and \
            checkpoint_dir(directory).is_dir():
        directory = checkpoint_dir(directory)
    out = []
    for path in directory.iterdir():
        step = step_of(path.name)
        if step is None or not path.is_dir():
            continue
        complete = TMP_SUFFIX not in path.name
        meta = _read_json(path / META_ITEM / "metadata") or {}
        orbax_meta = _read_json(path / "_CHECKPOINT_METADATA") or {}
        nsecs = orbax_meta.get("commit_timestamp_nsecs") or orbax_meta.get("init_timestamp_nsecs")
        when = (datetime.datetime.fromtimestamp(nsecs / 1e9, datetime.timezone.utc).isoformat(timespec="seconds")
                if nsecs else meta.get("time"))
        metrics = _read_json(path / "metrics" / "metrics") or meta.get("metrics")
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        out.append(CheckpointSummary(step=step, path=path, complete=complete, size_bytes=size, time=when,
                                     metrics=metrics, topology=meta.get("topology"),
                                     dwjax_version=meta.get("dwjax_version"),
                                     has_manifest=(path / MANIFEST_NAME).is_file()))
    return sorted(out, key=lambda s: (s.step, s.complete))


def committed_steps(directory: Path) -> list[int]:
    """The committed steps under `directory` (none if it does not exist), ascending."""
    if not directory.is_dir():
        return []
    return sorted(s for p in directory.iterdir()
                  if p.is_dir() and (s := step_of(p.name)) is not None and TMP_SUFFIX not in p.name)

