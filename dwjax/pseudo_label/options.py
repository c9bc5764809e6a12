"""The options of a labelling run (`LabelOptions`), which of them a resumption must keep (`fixed`), and the check
that it keeps them (`check_options`, against the run's labelling.json).

`LabelOptions.from_config(cfg)` is what `dwjax pseudo-label` runs with: the config's `label:` section (its flags
set it) plus the teacher and numerics of `model:`; the defaults here are those of the config
(`dwjax.config.LabelConfig`, ...)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from dwjax.config import Config, DataConfig, LabelConfig, ModelConfig
from dwjax.errors import UserError

#: the options of the run that made the labels, beside its part files
OPTIONS_FILE = "labelling.json"

#: options that must not change between a run and its resumption
_FIXED_OPTIONS = ("teacher", "timestamps", "language", "task", "num_beams", "max_new_tokens", "dtype", "pack",
                  "pack_gap_s", "pack_max_s", "pack_short")
#: decoding budget when `label.max_new_tokens` is null: a clip's label, or a packed window's (the decoder context)
NEW_TOKENS, PACKED_NEW_TOKENS = 224, 448

_L = LabelConfig


@dataclasses.dataclass(frozen=True)
class LabelOptions:
    teacher: str
    output: str
    batch_size: int = _L.batch_size                 # per device
    timestamps: bool = _L.timestamps
    language: Optional[str] = _L.language           # None: the example's language, else detected (multilingual)
    task: str = _L.task                             # rows without a manifest `task`
    num_beams: int = _L.num_beams
    max_new_tokens: int = NEW_TOKENS
    dtype: str = ModelConfig.dtype
    scan_layers: bool = ModelConfig.scan_layers
    commit_every: int = _L.commit_every             # batches per part file
    num_workers: int = DataConfig.num_workers       # audio decoding threads
    progress: bool = True
    pack: bool = _L.pack                            # label packed windows of consecutive clips (dwjax.data.packing)
    pack_gap_s: float = _L.pack_gap_s               # silence between packed clips
    pack_max_s: float = _L.pack_max_s               # longest packed window (<= 30 s; dwjax/data/packing.py: why 24)
    pack_short: float = _L.pack_short               # fraction of windows filled to a random shorter length

    @classmethod
    def from_config(cls, cfg: Config, progress: bool = True) -> "LabelOptions":
        """The options of `cfg.label` (timestamps always with pack), `cfg.model` and `data.num_workers`."""
        lab = cfg.label
        new_tokens = lab.max_new_tokens if lab.max_new_tokens is not None else (
            PACKED_NEW_TOKENS if lab.pack else NEW_TOKENS)
        return cls(teacher=cfg.model.teacher, output=lab.output, batch_size=lab.batch_size,
                   timestamps=lab.timestamps or lab.pack, language=lab.language, task=lab.task,
                   num_beams=lab.num_beams, max_new_tokens=new_tokens, dtype=cfg.model.dtype,
                   scan_layers=cfg.model.scan_layers, commit_every=lab.commit_every,
                   num_workers=cfg.data.num_workers, progress=progress, pack=lab.pack, pack_gap_s=lab.pack_gap_s,
                   pack_max_s=lab.pack_max_s, pack_short=lab.pack_short)

    def fixed(self) -> dict:
        return {k: getattr(self, k) for k in _FIXED_OPTIONS}


#: the value an option had before it was recorded in labelling.json (older runs)
_OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LabelOptions)}


def check_options(output: Path, opts: LabelOptions) -> Optional[dict]:
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
