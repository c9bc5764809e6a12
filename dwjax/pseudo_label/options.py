"""The options of a labelling run (`LabelOptions`), which of them a resumption must keep (`fixed`), and the check
that it keeps them (`check_options`, against the run's labelling.json)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from dwjax.data.packing import DEFAULT_PACK_S
from dwjax.errors import UserError

#: the options of the run that made the labels, beside its part files
OPTIONS_FILE = "labelling.json"

#: options that must not change between a run and its resumption
_FIXED_OPTIONS = ("teacher", "timestamps", "language", "task", "num_beams", "max_new_tokens", "dtype", "pack",
                  "pack_gap_s", "pack_max_s", "pack_short")


@dataclasses.dataclass(frozen=True)
class LabelOptions:
    teacher: str
    output: str
    batch_size: int = 8                 # per device
    timestamps: bool = False
    language: Optional[str] = None      # None: the example's language, else detected (multilingual teachers)
    task: str = "transcribe"            # rows without a manifest `task`
    num_beams: int = 1
    max_new_tokens: int = 224
    dtype: str = "float32"
    scan_layers: bool = True
    commit_every: int = 8               # batches per part file
    num_workers: int = 4                # audio decoding threads
    progress: bool = True
    pack: bool = False                  # label packed windows of consecutive clips (dwjax.data.packing); timestamps
    pack_gap_s: float = 0.5             # silence between packed clips (dwjax.data.packing.DEFAULT_GAP_S)
    pack_max_s: float = DEFAULT_PACK_S  # longest packed window (<= 30 s; dwjax/data/packing.py says why 24)
    pack_short: float = 0.0             # fraction of windows filled to a random shorter length (packing.pack)

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
