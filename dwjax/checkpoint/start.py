"""Where a run starts (`resolve_start`): this run's checkpoint, `checkpoint.init_from`, converted weights, or
nothing; the order is written in `dwjax.checkpoint`'s docstring."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from dwjax.checkpoint.layout import STATE_ITEM, TMP_SUFFIX, checkpoint_dir, committed_steps, step_of
from dwjax.config import CheckpointConfig, Config
from dwjax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class StartPoint:
    """Where training starts: `kind` is "resume", "init_from", "weights" or "fresh"."""
    kind: Literal["resume", "init_from", "weights", "fresh"]
    path: Path | None = None      # the checkpoints directory (resume/init_from) or the weights directory
    step: int | None = None       # the step to restore (resume/init_from)


def _locate_init_from(init_from: str) -> tuple[Path, int]:
    """(checkpoints directory, step) for `checkpoint.init_from`: a step dir, a checkpoints dir or a run dir."""
    path = Path(init_from)
    if not path.exists():
        raise CheckpointError(f"checkpoint.init_from={init_from}: no such directory")
    step = step_of(path.name)
    if step is not None and TMP_SUFFIX not in path.name and (path / STATE_ITEM).is_dir():
        return path.parent.absolute(), step
    for directory in (path, checkpoint_dir(path)):
        steps = committed_steps(directory)
        if steps:
            return directory.absolute(), steps[-1]
    raise CheckpointError(f"checkpoint.init_from={init_from}: no complete checkpoint there (expected a step "
                          f"directory, a checkpoints directory or a run directory)")


def resolve_start(output_dir: str | os.PathLike, cfg: Config | CheckpointConfig) -> StartPoint:
    """Which start applies (`dwjax.checkpoint`'s docstring): this run's checkpoint, init_from, converted weights, fresh.

    With a bare `CheckpointConfig`, the converted-weights step (model.student) is not known and is skipped."""
    steps = committed_steps(checkpoint_dir(output_dir))
    if steps:
        return StartPoint("resume", checkpoint_dir(output_dir).absolute(), steps[-1])
    ckpt_cfg = cfg.checkpoint if isinstance(cfg, Config) else cfg
    if ckpt_cfg.init_from:
        directory, step = _locate_init_from(ckpt_cfg.init_from)
        return StartPoint("init_from", directory, step)
    student = cfg.model.student if isinstance(cfg, Config) else None
    if student:
        return StartPoint("weights", Path(student))
    return StartPoint("fresh")
