"""Pseudo-labelling: a teacher transcribes datasets on every device of every process; resumable and idempotent.

    label_datasets(specs, LabelOptions(teacher=..., output=DIR), cfg) -> summary dict (process 0; None elsewhere)

Work split. All examples of all datasets are sorted by (dataset, id); ids already present in DIR's part files
are removed (every process reads every part: completed ids are global facts, so a rerun may use another process
count). Global batch g of the remaining list covers positions [g*B, (g+1)*B), B = per-device batch x devices;
row r of it is decoded by the device the batch sharding puts it on, so each process reads, decodes and writes
only the rows its own devices hold (a contiguous block, r // (B / P) == process on the usual device order).

One jitted function per run: log-mel (sharded over the batch), then encode + greedy generate with the teacher's
parameters replicated on every device (multilingual teachers without --language detect the language per row
inside the same call). Audio is decoded on a thread pool one batch ahead of the device.

Output, under DIR:
    labels-{process:05d}-of-{processes:05d}-part{k:05d}.parquet   rows of one process (SCHEMA), written to a
        hidden temporary file and renamed every `commit_every` batches; `datasets.load_dataset("parquet",
        data_files="DIR/labels-*.parquet")` reads them.
    labelling.json    teacher and decoding options; a rerun with different ones is refused.
    summary.json      audio hours, throughput, WER distribution and kept fractions per dataset (`summarise`).

Audio held as bytes (a `datasets` save_to_disk Audio column with embedded files, a parquet/arrow bytes column):
the row's `audio` (a path) is null and `audio_bytes` holds the encoded file as it was, so training
(dwjax/data/loader.py) reads the clip from the labels alone; a packed window of such clips has `member_audio_bytes`,
each member's file in member order (null for a member read from a path). Both are null for audio read from a path,
and absent from labels of older versions.

Rows that cannot be labelled (missing / corrupt / truncated / empty audio, over 30 s without a long-form decoder,
an unknown language) are written with `status` = the reason and no label; `status == "ok"` marks a label. Each is
named on stderr as it is written; the run goes on, and `dwjax pseudo-label` exits 1 at the end when the output
holds any such failed row. Rows without speech get status "no speech: <why>" and no label either (a teacher
labels digital silence "you"; on data without references that label would reach training): audio whose peak
amplitude is below `dwjax.audio.SILENCE_PEAK` (never decoded), or a <= 30 s clip whose teacher no-speech
probability is above NO_SPEECH_THRESHOLD while its average log-probability is below LOGPROB_THRESHOLD (Whisper's
own rule for skipping a silent window). No-speech rows are not failures: the summary counts them apart. `wer` is the
fraction (not %) of word errors of the label against the reference, both normalised with `normalize_english`;
null where there is no reference or the normalised reference is empty (filter those out, as the paper does).
`token_ids` are the generated tokens without the prompt and without EOT.

Languages and tasks. A row's language is, in this order: `--language` (forced for the run), the manifest row's
`language`, else the one the teacher detects (multilingual teachers; `language_source` says which: "forced",
"manifest", "detected"); `language_probability` is the teacher's probability of the row's language (softmax over
the language tokens after <|startoftranscript|>, as Whisper's detect_language; null for beam search and
long-form rows). A row's task is the manifest row's `task` (transcribe / translate), else `--task`. `wer` is then
scored the way `dwjax.text.languages` says for the row's language: WER on English-normalised text for English,
WER on basic-normalised text for other languages, CER for languages written without spaces (`metric` says which);
for translate rows it is the WER of the English label against the reference (an English translation). Rows whose
language cannot be used get no label and a failure status, one line on stderr per (dataset, language) however
many rows share it: "unknown language" (not a Whisper code or name), "unsupported language" (not in the teacher's
vocabulary, or not English for an English-only teacher); a row whose reference is not written in its language's
script gets "mixed scripts" (one line per row). Translate rows for an English-only teacher are refused with the
run (one line).

Packed labelling (`LabelOptions(pack=True)`, `dwjax pseudo-label --pack`). Every pending clip is read first (on
every process, so all agree on the windows); clips that are missing, unreadable, empty, silent or of an unknown
language get their own rows exactly as above, clips over 30 s are labelled on their own (long-form), and the good
<= 30 s clips are packed by `dwjax.data.packing.pack` per (dataset, language) into windows of <= `pack_max_s`
(default 30 s): consecutive clips (in (dataset, id) order) of one `speaker` (the manifest's speaker/source column;
without one, all clips of a dataset in order), `pack_gap_s` (default 0.5 s) of digital silence between clips, no
clip split. The teacher decodes each window with timestamp tokens (`pack` implies `timestamps`) and writes one row
per window: `id` is "<first member id>+<number of members>", `audio` is null, `duration_s` the window's length
(gaps included), `members` a JSON list of {"id", "offset_s", "duration_s", "audio"} (each clip's start in the
window; "audio" its path, null for bytes: `member_audio_bytes`), `source` the speaker key, `reference` the members'
references joined with one space when every member has a non-empty one (else null), `wer` the window label's WER
against that joined reference (so a WER filter keeps or drops the window as a whole), `timestamps` the segments
in window time. The member clips count as labelled (`completed_keys`), so a rerun skips them; windows are a
deterministic function of the pending clips, their durations, speakers and the options, so a single-process run
resumed after an interruption makes the same windows.
A window of two or more clips never gets a truncated label: windows are closed early when the members' references (tokenised, with
a margin for timestamps) would pass the decoding budget `max_new_tokens` (`dwjax pseudo-label --pack` makes it
448, the decoder context, unless given; LabelOptions' own default stays 224; either is capped at 448 minus the
prompt), and a window whose decoding still reaches the budget is split in two and each
half decoded again; the summary counts those splits (`token_limit_splits`) and the single clips that still hit
the budget (`token_limit_truncated`, labelled like any clip that does). `summary.json` counts per dataset the
`windows` and the `packed_clips` they hold; `audio_hours` counts clip audio, not the gaps.

Runaway stop. A teacher that loops on a short clip ("and the, and the, ...") would decode to the budget (448
tokens for 3 s of audio) while the whole batch waits, and a packed window doing so would be split and decoded
again. Each row may therefore generate at most `runaway_limit(duration)` tokens (RUNAWAY_TOKENS_PER_S per second
of audio plus RUNAWAY_MARGIN; kept labels of real English speech run at up to ~7 tokens per second). A row that
reaches that limit below the budget gets status "runaway: ..." and no label (not a failure; its text stays for
inspection; the summary counts `runaway` rows); every row that ends earlier gets exactly the label it would get
without the stop. A window (or half window) that reaches the budget itself is split as above only when its text
is not a loop; one whose text compresses more than RUNAWAY_COMPRESSION (zlib, Whisper's 2.4) is a runaway row too
(splitting a loop only decodes it again, twice).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dwjax.audio import N_SAMPLES, SAMPLE_RATE, SILENCE_PEAK, is_silent, load_audio, load_audio_bytes
from dwjax.data.manifest import Example, read_dataset
from dwjax.data.packing import DEFAULT_PACK_S
from dwjax.errors import AudioError, ConfigError, UserError

__all__ = ["LabelOptions", "label_datasets", "read_labels", "completed_keys", "part_files", "summarise",
           "format_summary", "SCHEMA", "THRESHOLDS", "PART_GLOB", "FAILURE_KINDS", "NO_SPEECH", "is_failure",
           "status_kind"]

PART_GLOB = "labels-*-of-*-part*.parquet"
PART_RE = re.compile(r"^labels-(\d{5})-of-(\d{5})-part(\d{5})\.parquet$")
THRESHOLDS = (5, 10, 20, 40, 80)          # WER % thresholds reported in the summary
OPTIONS_FILE = "labelling.json"
SUMMARY_FILE = "summary.json"
#: options that must not change between a run and its resumption
_FIXED_OPTIONS = ("teacher", "timestamps", "language", "task", "num_beams", "max_new_tokens", "dtype", "pack",
                  "pack_gap_s", "pack_max_s", "pack_short")


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
#: the kinds of rows that get no label because something failed (the part of `status` before the first ":")
FAILURE_KINDS = ("missing audio", "empty audio", "unreadable audio", "longer than 30 s", "unknown language",
                 "unsupported language", "mixed scripts", "long-form decoding failed")
#: failure kinds decided by a (dataset, language) pair: reported once per pair, not once per row
LANGUAGE_KINDS = ("unknown language", "unsupported language")
#: the kind of rows that get no label because they hold no speech (not a failure)
NO_SPEECH = "no speech"
RUNAWAY = "runaway"
#: the runaway stop (module docstring): a row may generate RUNAWAY_MARGIN + RUNAWAY_TOKENS_PER_S x its seconds
RUNAWAY_TOKENS_PER_S = 20
RUNAWAY_MARGIN = 16
#: a decoding that reached the budget with a text compressing more than this is a loop, not too much speech
RUNAWAY_COMPRESSION = 2.4
#: Whisper's no-speech rule (openai/whisper transcribe()): a window is silent when the no-speech probability is
#: above NO_SPEECH_THRESHOLD and the decoding's average log-probability is below LOGPROB_THRESHOLD
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0


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


# ---------------------------------------------------------------------------------------------- part files


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


# ---------------------------------------------------------------------------------------------- rows


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data))) if data else 0.0


def row_wer(reference: Optional[str], hypothesis: str, language: Optional[str] = None,
            task: Optional[str] = None) -> Optional[float]:
    """Error rate (fraction) of one label against its reference, the way `dwjax.text.languages.score` scores
    `language` (WER, or CER for languages written without spaces); a translation is English. None without
    reference words."""
    if reference is None:
        return None
    from dwjax.text.languages import score
    rates = score(_safe_language(_scored_language(language, task)), [reference], [hypothesis])
    return None if rates["n_pairs"] == 0 else float(rates["rate"])


def _scored_language(language: Optional[str], task: Optional[str]) -> Optional[str]:
    """The language a label is written in: English for a translation, else the row's language."""
    return "en" if task == "translate" else language


def _safe_language(language: Optional[str]) -> Optional[str]:
    """`language` when dwjax.text.languages knows it, else None (scored as English)."""
    from dwjax.text.tokenizer import resolve_language
    try:
        return resolve_language(language) if language else None
    except UserError:
        return None


def row_metric(language: Optional[str], task: Optional[str]) -> str:
    from dwjax.text.languages import metric
    return metric(_safe_language(_scored_language(language, task)))


def _base_row(e: Example, duration: Optional[float], status: str) -> dict:
    return {"id": e.id, "dataset": e.dataset, "audio": e.audio_path, "duration_s": duration, "text": None,
            "token_ids": None, "language": None, "avg_logprob": None, "compression_ratio": None,
            "no_speech_prob": None, "timestamps": None, "reference": e.text,
            "reference_encoding_errors": bool(e.encoding_errors), "wer": None, "status": status,
            "members": None, "source": None, "task": e.task, "language_probability": None,
            "language_source": None, "metric": None, "audio_bytes": e.audio_bytes, "member_audio_bytes": None}


def status_kind(status: Optional[str]) -> str:
    """"ok", NO_SPEECH or the failure kind of a row's `status`."""
    return "ok" if status == "ok" else (status or "").split(":", 1)[0]


def is_failure(status: Optional[str]) -> bool:
    """A row that got no label because something failed (not "ok", "no speech" or "runaway")."""
    return status_kind(status) not in ("ok", NO_SPEECH, RUNAWAY)


def runaway_limit(duration_s: Optional[float], budget: int) -> int:
    """The most tokens a row of `duration_s` seconds may generate (module docstring: Runaway stop), <= budget."""
    if duration_s is None:
        return budget
    return min(budget, RUNAWAY_MARGIN + int(math.ceil(RUNAWAY_TOKENS_PER_S * duration_s)))


def looped(teacher: "_Teacher", ids: list[int]) -> bool:
    """Whether a decoding's text is a loop: it compresses more than RUNAWAY_COMPRESSION (module docstring)."""
    return compression_ratio(teacher.tok.decode(ids).strip()) > RUNAWAY_COMPRESSION


def ran_away(teacher: "_Teacher", ids: list[int], limit: int) -> bool:
    """Whether a decoding stopped by the runaway stop: it reached its limit below the budget, or reached the budget
    with a looping text (module docstring: Runaway stop)."""
    return len(ids) >= limit and (limit < teacher.max_new or looped(teacher, ids))


def runaway_row(row: dict, n_tokens: int, duration_s: float) -> dict:
    """A decoded row that reached its runaway limit: status "runaway: ...", no label (its text kept to inspect)."""
    if row["status"] != "ok":      # no speech wins: it is the more specific verdict
        return row
    return dict(row, status=f"{RUNAWAY}: {n_tokens} tokens for {duration_s:.1f} s of audio without an end "
                            f"(the stop: {RUNAWAY_TOKENS_PER_S} tokens per second + {RUNAWAY_MARGIN})")


def no_speech_status(duration: Optional[float], no_speech_prob: float, avg_logprob: float) -> Optional[str]:
    """The "no speech: ..." status of a decoded clip of <= 30 s that Whisper's rule calls silent, else None."""
    if duration is None or duration > N_SAMPLES / SAMPLE_RATE:
        return None
    if no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD:
        return (f"{NO_SPEECH}: teacher no-speech probability {no_speech_prob:.2f} > {NO_SPEECH_THRESHOLD} with "
                f"average log-probability {avg_logprob:.2f} < {LOGPROB_THRESHOLD}")
    return None


def _label_row(e: Example, duration: float, text: str, tokens: list[int], language: Optional[str],
               avg_logprob: float, no_speech_prob: float, segments: Optional[list], task: str = "transcribe",
               language_probability: Optional[float] = None, language_source: Optional[str] = None) -> dict:
    silent = no_speech_status(duration, float(no_speech_prob), float(avg_logprob))
    if silent is not None:      # no label; the teacher's scores stay for inspection
        row = _base_row(e, duration, silent)
        row.update(language=language, avg_logprob=float(avg_logprob), no_speech_prob=float(no_speech_prob),
                   task=task, language_probability=language_probability, language_source=language_source)
        return row
    row = _base_row(e, duration, "ok")
    row.update(text=text, token_ids=[int(t) for t in tokens], language=language, avg_logprob=float(avg_logprob),
               compression_ratio=compression_ratio(text), no_speech_prob=float(no_speech_prob),
               timestamps=json.dumps(segments, ensure_ascii=False) if segments is not None else None,
               wer=row_wer(e.text, text, language, task), task=task, language_probability=language_probability,
               language_source=language_source, metric=row_metric(language, task))
    return row


@dataclasses.dataclass
class _Loaded:
    example: Example
    audio: Optional[np.ndarray]          # None when unusable (or silent)
    duration: Optional[float]
    status: str                          # "ok", "long", "no speech: ..." or the failure reason


def _audio_error_kind(message: str) -> str:
    if "does not exist" in message or "is a directory" in message:
        return "missing audio"
    if "is empty" in message:
        return "empty audio"
    return "unreadable audio"


def _load(e: Example) -> _Loaded:
    try:
        if e.audio_path is not None and os.path.isfile(e.audio_path) and os.path.getsize(e.audio_path) == 0:
            return _Loaded(e, None, 0.0, f"empty audio: audio file {e.audio_path} is empty (0 bytes)")
        if e.audio_bytes is not None:
            audio = load_audio_bytes(e.audio_bytes, name=f"{e.dataset}/{e.id}")
        else:
            audio = load_audio(e.audio_path)
    except AudioError as err:
        return _Loaded(e, None, e.duration_s, f"{_audio_error_kind(str(err))}: {err}")
    except Exception as err:  # a row must never stop the run
        return _Loaded(e, None, e.duration_s, f"unreadable audio: {type(err).__name__}: {err}")
    duration = len(audio) / SAMPLE_RATE
    if is_silent(audio):
        return _Loaded(e, None, duration, f"{NO_SPEECH}: silent audio (peak amplitude below {SILENCE_PEAK:g})")
    return _Loaded(e, audio, duration, "long" if len(audio) > N_SAMPLES else "ok")


# ---------------------------------------------------------------------------------------------- device step


class _Teacher:
    """The teacher on a mesh: replicated parameters and one jitted, batch-sharded log-mel + encode + generate."""

    def __init__(self, opts: LabelOptions, mesh):
        import dataclasses as dc

        import jax
        import jax.numpy as jnp

        from dwjax.decoding.rules import DecodeSpec
        from dwjax.decoding.transcribe import DTYPES
        from dwjax.mesh import data_sharding, replicated
        from dwjax.models.whisper import Whisper
        from dwjax.weights.loading import load_model

        if opts.dtype not in DTYPES:
            raise UserError(f"unknown dtype {opts.dtype!r}; use float32 or bfloat16")
        self.opts, self.mesh = opts, mesh
        self.loaded = load_model(opts.teacher)
        self.cfg, self.tok = self.loaded.cfg, self.loaded.tokenizer
        self.multilingual = self.tok.is_multilingual
        if not self.multilingual and opts.task == "translate":
            raise UserError("an English-only teacher cannot translate; use a multilingual model")
        self.model = Whisper(self.cfg, dtype=DTYPES[opts.dtype], scan_layers=opts.scan_layers)
        self.spec = dc.replace(DecodeSpec.for_model(self.tok, self.loaded.generation, self.cfg.vocab_size),
                               timestamps=bool(opts.timestamps))
        self.forced_language = None
        if opts.language:       # the run's option: a bad one refuses the run (one line)
            from dwjax.text.languages import check_language
            code = check_language(opts.language, self.tok, f"the teacher {opts.teacher}")
            if self.multilingual:
                self.forced_language = self.tok.language_token(code)
        # the prompt; multilingual: a language placeholder at position 1, filled per row inside the step
        if self.multilingual:
            self.template = self.tok.sot_sequence(next(iter(self.tok.languages)), opts.task, opts.timestamps)
        else:
            self.template = self.tok.sot_sequence(None, None, opts.timestamps)
        self.code_of = {i: c for c, i in self.tok.languages.items()} if self.multilingual else {}
        self.max_new = min(opts.max_new_tokens, self.cfg.n_text_ctx - len(self.template))
        self.batch_sharding = data_sharding(mesh)
        self.replicated = replicated(mesh)
        self.params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, self.loaded.params), self.replicated)
        # each device decodes its own rows with its own while loop (shard_map): no collective at all, so a device
        # never waits for another's longest row, and a row's result does not depend on which device holds it
        from jax.sharding import PartitionSpec as P

        from dwjax.mesh import BATCH_AXES
        rows = P(BATCH_AXES)
        step = jax.shard_map(self._step_impl, mesh=mesh, in_specs=(P(), rows, rows, rows, rows, rows),
                             out_specs=rows, check_vma=False)
        self._step = jax.jit(step, in_shardings=(self.replicated,) + (self.batch_sharding,) * 5,
                             out_shardings=self.batch_sharding)
        self._mel = jax.jit(self._mel_impl, in_shardings=self.batch_sharding, out_shardings=self.batch_sharding)

    def _mel_impl(self, audio):
        from dwjax.audio import log_mel_spectrogram
        return log_mel_spectrogram(audio, n_mels=self.cfg.n_mels)

    def _step_impl(self, params, mel, lang, task, active, limit):
        lang_ids = tuple(self.tok.languages.values()) if self.multilingual else None
        return label_step(self.model, self.spec, self.template, lang_ids, self.max_new, params, mel, lang,
                          task if self.multilingual else None, active, limit)

    def limits(self, durations: Sequence[Optional[float]], n_local: int) -> np.ndarray:
        """(n_local,) int32: each row's runaway limit (`runaway_limit`); padding rows get the budget."""
        out = np.full((n_local,), self.max_new, np.int32)
        out[: len(durations)] = [runaway_limit(d, self.max_new) for d in durations]
        return out

    def language_id(self, e: Example) -> int | str:
        """The forced language token of a row (-1: detect), or a failure status when the row's language cannot
        be used: "unknown language: ..." or "unsupported language: ..." (see the module docstring)."""
        if self.forced_language is not None:
            return self.forced_language
        if not e.language:
            return -1
        from dwjax.text.languages import check_language
        try:
            code = check_language(e.language, self.tok, f"the teacher {self.opts.teacher}")
        except ConfigError as err:
            from dwjax.text.tokenizer import LANGUAGES, resolve_language
            try:
                known = resolve_language(e.language) in LANGUAGES
            except ConfigError:
                known = False
            return f"{'unsupported' if known else 'unknown'} language: {err}"
        return self.tok.language_token(code) if self.multilingual else -1

    def language_source(self, e: Example) -> str:
        return "forced" if self.forced_language is not None else ("manifest" if e.language else "detected")

    def task(self, e: Example) -> str:
        return e.task or self.opts.task

    def task_id(self, e: Example) -> int:
        """The task token of a row (multilingual teachers; -1 for English-only ones, which have no task)."""
        if not self.multilingual:
            return -1
        return self.tok.translate if self.task(e) == "translate" else self.tok.transcribe

    def check(self, e: Example) -> int | str:
        """`language_id`, or the "mixed scripts: ..." status of a row whose reference is not written in the
        script of its language (the forced or manifest one; a translation's reference is English)."""
        lid = self.language_id(e)
        if isinstance(lid, str) or e.text is None:
            return lid
        from dwjax.text.languages import script_problem
        language = "en" if self.task(e) == "translate" else (self.opts.language or e.language)
        problem = script_problem(e.text, language)
        return problem if problem is not None else lid

    def run(self, local_audio: np.ndarray, local_lang: np.ndarray, global_b: int,
            local_task: Optional[np.ndarray] = None, local_active: Optional[np.ndarray] = None,
            local_limit: Optional[np.ndarray] = None):
        """Global arrays from this process's rows, one step, this process's rows of the results (numpy).
        `local_task`: each row's task token (default: the run's task). `local_active`: False for padding rows
        (not encoded, decoded as done: their results are meaningless); default all True. `local_limit`: each
        row's most generated tokens (`limits`, the runaway stop); default the budget."""
        import jax
        s = self.batch_sharding
        if local_task is None:
            local_task = np.full(local_lang.shape, self.template[2] if self.multilingual else -1, np.int32)
        audio = jax.make_array_from_process_local_data(s, local_audio, (global_b, N_SAMPLES))
        lang = jax.make_array_from_process_local_data(s, local_lang, (global_b,))
        task = jax.make_array_from_process_local_data(s, local_task, (global_b,))
        if local_active is None:
            local_active = np.ones(local_lang.shape, bool)
        active = jax.make_array_from_process_local_data(s, np.asarray(local_active, bool), (global_b,))
        if local_limit is None:
            local_limit = np.full(local_lang.shape, self.max_new, np.int32)
        limit = jax.make_array_from_process_local_data(s, np.asarray(local_limit, np.int32), (global_b,))
        out = self._step(self.params, self._mel(audio), lang, task, active, limit)
        return {k: _local_rows(v, local_audio.shape[0]) for k, v in out.items()}


def label_step(model, spec, template, language_ids, max_new: int, params, mel, lang, task=None, active=None,
               limit=None):
    """One device's rows: encoder, language detection (multilingual teachers, rows with lang < 0), greedy decode.

    `template` is the prompt; for multilingual teachers position 1 holds the language token, filled per row from
    `lang` (>= 0: forced) or the detected language, and position 2 the task token, per row from `task` when
    given. Outputs also `language` (the token used) and `language_probability` (the teacher's probability of it
    among the language tokens). Pure: the pseudo-labeller runs it under shard_map; the accelerator benchmark
    times the same function. `active` (b,) bool: False for padding rows (not encoded, decoded as done). `limit`
    (b,) int: each row's most generated tokens (the runaway stop; default max_new)."""
    import jax
    import jax.numpy as jnp

    from dwjax.decoding.generate import decode_loop
    from dwjax.models.whisper import encode_batch
    b = mel.shape[0]
    enc = encode_batch(model, params, mel, active)
    prompt = jnp.broadcast_to(jnp.asarray(template, jnp.int32), (b, len(template)))
    if language_ids is not None:
        ids = jnp.asarray(language_ids, jnp.int32)
        logits, _ = model.apply({"params": params}, jnp.full((b, 1), spec.sot, jnp.int32), enc, None,
                                method="decode")
        scores = jnp.take(logits[:, 0], ids, axis=-1).astype(jnp.float32)
        detected = ids[jnp.argmax(scores, axis=-1)]
        lang = jnp.where(lang >= 0, lang, detected).astype(jnp.int32)
        probs = jax.nn.softmax(scores, axis=-1)
        lang_prob = jnp.sum(jnp.where(ids[None, :] == lang[:, None], probs, 0.0), axis=-1)
        prompt = prompt.at[:, 1].set(lang)
        if task is not None:
            prompt = prompt.at[:, 2].set(jnp.asarray(task, jnp.int32))
    out = decode_loop(model, spec, params, enc, prompt, max_new, 0.0, None, 0, active=active, limit=limit)
    out["language"] = lang
    if language_ids is not None:
        out["language_probability"] = lang_prob
    return out


def _local_rows(x, n_local: int) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global order, from its addressable shards."""
    shards = sorted(x.addressable_shards, key=lambda sh: sh.index[0].start or 0)
    lo = shards[0].index[0].start or 0
    out = np.empty((n_local,) + x.shape[1:], x.dtype)
    for sh in shards:
        start = (sh.index[0].start or 0) - lo
        data = np.asarray(sh.data)
        out[start: start + data.shape[0]] = data
    return out


def local_row_range(sharding, global_b: int) -> tuple[int, int]:
    """[lo, hi): the rows of a (global_b,) batch this process's devices hold (must be one contiguous block)."""
    idx = sorted({(sl[0].start or 0, global_b if sl[0].stop is None else sl[0].stop)
                  for sl in sharding.addressable_devices_indices_map((global_b,)).values()})
    lo, hi = idx[0][0], idx[0][1]
    for start, stop in idx[1:]:
        if start != hi:
            raise ConfigError("this process's devices do not hold one contiguous block of the batch; "
                              "the pseudo-labeller needs the mesh's devices ordered by process")
        hi = stop
    return lo, hi


# ---------------------------------------------------------------------------------------------- the run


def _sorted_examples(specs: Sequence[str]) -> list[Example]:
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for spec in specs:
        rows = read_dataset(spec)
        name = rows[0].dataset if rows else str(spec)
        if name in seen:
            raise UserError(f"two datasets are named {name!r} ({seen[name]} and {spec}); name them: NAME=PATH")
        seen[name] = str(spec)
        examples.extend(rows)
    return sorted(examples, key=lambda e: (e.dataset, e.id))


def _sync(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _fingerprint(pending: list[Example]) -> int:
    h = 0
    for e in pending:
        h = zlib.crc32(f"{e.dataset}\x00{e.id}\n".encode("utf-8", "surrogatepass"), h)
    return h


def _local_transcriber(teacher: "_Teacher", opts: LabelOptions, cache: dict):
    """A single-device Transcriber sharing the teacher's weights (long-form audio and beam search)."""
    if "transcriber" not in cache:
        from dwjax.decoding.transcribe import Transcriber
        cache["transcriber"] = Transcriber(teacher.loaded, dtype=opts.dtype, batch_size=max(1, opts.batch_size),
                                           scan_layers=opts.scan_layers)
    return cache["transcriber"]


def _long_form():
    """`dwjax.decoding.longform.transcribe_long`, or None where no long-form decoder is installed."""
    try:
        from dwjax.decoding.longform import transcribe_long
    except ImportError:
        return None
    return transcribe_long


def _decode_kw(opts: LabelOptions, language: Optional[str], task: Optional[str] = None) -> dict:
    kw = dict(language=language, task=task or opts.task, timestamps=opts.timestamps,
              max_new_tokens=opts.max_new_tokens)
    if opts.num_beams > 1:
        kw["num_beams"] = opts.num_beams
    return kw


def _transcript_row(e: Example, duration: float, t, timestamps: bool, task: str = "transcribe",
                    language_source: Optional[str] = None) -> dict:
    segs = t.segments if timestamps else None
    return _label_row(e, duration, t.text, t.tokens, t.language or "en", t.avg_logprob, t.no_speech_prob, segs,
                      task, None, language_source)


def _check_languages(pending: list[Example], teacher: "_Teacher", report: bool = True) -> None:
    """Refuses translate rows for an English-only teacher (one line, the whole run); names each (dataset,
    language) whose rows cannot be labelled, one line per pair on stderr (`report`), with how many rows it has
    (those rows get the failure status, `_Teacher.language_id`; every other row is labelled)."""
    if not teacher.multilingual:
        translate = [e for e in pending if teacher.task(e) == "translate"]
        if translate:
            raise UserError(f"the teacher {teacher.opts.teacher} is English-only and cannot translate; "
                            f"{len(translate)} row(s) ask for task translate (first: {translate[0].dataset}/"
                            f"{translate[0].id}): use a multilingual teacher such as builtin:whisper-base")
    bad: dict[tuple[str, str], list] = {}
    for e in pending:
        if e.language and teacher.forced_language is None:
            key = (e.dataset, e.language)
            if key not in bad:
                bad[key] = [teacher.language_id(e), 0]
            bad[key][1] += 1
    for (dataset, language), (status, n) in bad.items():
        if report and isinstance(status, str):
            print(f"dwjax pseudo-label: error: {dataset}: {n} row(s) of language {language!r} get no label: "
                  f"{status}", file=sys.stderr, flush=True)


def _report_failure(row: dict, bar=None) -> None:
    """One line on stderr naming a row that failed (above the progress bar when there is one). Rows whose
    language cannot be used are not named one by one: `_report_languages` named their (dataset, language)."""
    if status_kind(row["status"]) in LANGUAGE_KINDS:
        return
    line = f"dwjax pseudo-label: error: {row['dataset']}/{row['id']}: {row['status']}"
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def _run_per_clip(pending: list[Example], opts: LabelOptions, teacher: "_Teacher", output: Path, proc: int,
                  n_proc: int, lo: int, hi: int, global_b: int, n_examples: int, n_done: int, n_dev: int) -> dict:
    """Each clip its own 30 s window: this process's rows of every global batch, decoded and written."""
    from dwjax.mesh import is_main_process

    n_local = hi - lo
    n_batches = math.ceil(len(pending) / global_b)
    if is_main_process():
        print(f"dwjax pseudo-label: teacher {opts.teacher}; {n_examples} examples, {n_done} already labelled, "
              f"{len(pending)} to label in {n_batches} global batches of {global_b} "
              f"({opts.batch_size} per device x {n_dev} devices, {n_local} rows per process x {n_proc} processes)",
              flush=True)

    part_index = _next_part_index(output, proc, n_proc)
    buffer: list[dict] = []
    local_audio_s, local_rows, local_ok, local_failed = 0.0, 0, 0, 0
    local_cache: dict = {}
    bar = None
    if is_main_process() and opts.progress and n_batches:
        from tqdm import tqdm
        bar = tqdm(total=len(pending), unit="utt", dynamic_ncols=True, file=sys.stderr, desc="pseudo-label")
    t0 = time.time()

    def rows_of(g: int) -> list[Example]:
        start = g * global_b
        return pending[start + lo: min(start + hi, len(pending))]

    with cf.ThreadPoolExecutor(max_workers=max(1, opts.num_workers)) as pool:
        def submit(g: int):
            return [pool.submit(_load, e) for e in rows_of(g)] if g < n_batches else []

        ahead = submit(0)
        for g in range(n_batches):
            current, ahead = ahead, submit(g + 1)        # decode the next batch's audio while the device works
            loaded = [f.result() for f in current]
            audio = np.zeros((n_local, N_SAMPLES), np.float32)
            lang = np.full((n_local,), -1, np.int32)
            task = np.full((n_local,), -1, np.int32)
            on_device = []
            for i, item in enumerate(loaded):
                if item.status in ("ok", "long"):
                    lid = teacher.check(item.example)
                    if isinstance(lid, str):
                        item.status = lid
                        continue
                if item.status == "ok":
                    lang[i] = lid
                    task[i] = teacher.task_id(item.example)
                    audio[i, : len(item.audio)] = item.audio
                    on_device.append(i)
            rows: list[Optional[dict]] = [None] * len(loaded)
            if opts.num_beams > 1:
                # beam search: decoded per process on its first local device (no sharded beam search yet)
                tr = _local_transcriber(teacher, opts, local_cache)
                for i in on_device:
                    item = loaded[i]
                    language = teacher.code_of.get(int(lang[i])) if lang[i] >= 0 else None
                    e = item.example
                    t = tr.transcribe_batch([item.audio], **_decode_kw(opts, language, teacher.task(e)))[0]
                    rows[i] = _transcript_row(e, item.duration, t, opts.timestamps, teacher.task(e),
                                              teacher.language_source(e))
            elif on_device or n_proc > 1:
                limit = teacher.limits([item.duration for item in loaded], n_local)
                out = teacher.run(audio, lang, global_b, task, local_limit=limit)
                for i in on_device:
                    item = loaded[i]
                    e = item.example
                    ids = out["tokens"][i, : out["lengths"][i]].tolist()
                    text = teacher.tok.decode(ids).strip()
                    segs = teacher.tok.segments(ids, duration=item.duration) if opts.timestamps else None
                    language = teacher.code_of.get(int(out["language"][i]), "en") if teacher.multilingual else "en"
                    avg_lp = float(out["sum_logprob"][i]) / (int(out["lengths"][i]) + 1)
                    prob = float(out["language_probability"][i]) if teacher.multilingual else None
                    rows[i] = _label_row(e, item.duration, text, ids, language, avg_lp,
                                         float(out["no_speech_prob"][i]), segs, teacher.task(e), prob,
                                         teacher.language_source(e))
                    if ran_away(teacher, ids, limit[i]):
                        rows[i] = runaway_row(rows[i], len(ids), item.duration)
            for i, item in enumerate(loaded):
                if rows[i] is not None:
                    continue
                if item.status == "long":
                    transcribe_long = _long_form()
                    if transcribe_long is None:
                        reason = f"longer than 30 s: {item.duration:.1f} s, no long-form decoder (dwjax.decoding.longform)"
                        rows[i] = _base_row(item.example, item.duration, reason)
                    else:
                        tr = _local_transcriber(teacher, opts, local_cache)
                        e = item.example
                        lid = teacher.language_id(e)
                        language = teacher.code_of.get(lid) if isinstance(lid, int) and lid >= 0 else None
                        try:
                            t = transcribe_long(tr, item.audio, **_decode_kw(opts, language, teacher.task(e)))
                            rows[i] = _transcript_row(e, item.duration, t, opts.timestamps, teacher.task(e),
                                                      teacher.language_source(e))
                        except Exception as err:  # a row must never stop the run
                            rows[i] = _base_row(item.example, item.duration,
                                                f"long-form decoding failed: {type(err).__name__}: {err}")
                else:
                    rows[i] = _base_row(item.example, item.duration, item.status)
            for r in rows:
                local_rows += 1
                if r["status"] == "ok":
                    local_ok += 1
                    local_audio_s += r["duration_s"] or 0.0
                elif is_failure(r["status"]):
                    local_failed += 1
                    _report_failure(r, bar)
            buffer.extend(rows)
            if buffer and ((g + 1) % opts.commit_every == 0 or g + 1 == n_batches):
                _write_part(output, proc, n_proc, part_index, buffer)
                part_index += 1
                buffer = []
            if bar is not None:   # process 0's audio, scaled to all processes (no communication)
                bar.update(min(global_b, len(pending) - g * global_b))
                audio_s = local_audio_s * n_proc
                bar.set_postfix_str(f"~{audio_s / 3600:.3f} h audio, ~{audio_s / max(time.time() - t0, 1e-9):.2f} "
                                    "audio-s/s", refresh=False)
    if bar is not None:
        bar.close()
    return {"audio_s": local_audio_s, "rows": local_rows, "ok": local_ok, "failed": local_failed,
            "wall": time.time() - t0}



#: per-process counts summed over processes at the end of a run (the first four for every run, the rest --pack)
_TOTALS = ("audio_s", "rows", "ok", "failed", "windows", "packed_clips", "token_limit_splits",
           "token_limit_truncated")
#: token estimate of a packed member from its reference: ceil(factor x reference tokens) + per-member timestamps
_TOKEN_FACTOR, _TOKENS_PER_MEMBER, _TOKEN_MARGIN = 1.2, 4, 8
#: keep the probed audio in memory for the windows when all of it fits in this many bytes (else read it again)
_KEEP_AUDIO_BYTES = 1 << 30


def _probe(e: Example, keep: bool) -> _Loaded:
    item = _load(e)
    if not keep:
        item.audio = None if item.status == "ok" else item.audio
    return item


def _member_audio(e: Example, cached: Optional[np.ndarray]) -> np.ndarray:
    if cached is not None:
        return cached
    item = _load(e)
    if item.audio is None:
        raise AudioError(f"{e.dataset}/{e.id}: {item.status} (read again for its window)")
    return item.audio


def _run_packed(pending: list[Example], opts: LabelOptions, teacher: "_Teacher", output: Path, proc: int,
                n_proc: int, lo: int, hi: int, global_b: int, n_examples: int, n_done: int, n_dev: int) -> dict:
    """--pack: probe every pending clip, pack the good ones into windows, label the windows (module docstring)."""
    from dwjax.data.packing import Utterance, members_json, pack, window_audio
    from dwjax.mesh import is_main_process

    t0 = time.time()
    n_local = hi - lo
    # 1. read every pending clip (all processes: every one must derive the same windows)
    keep = sum(os.path.getsize(e.audio_path) if e.audio_path and os.path.isfile(e.audio_path) else
               len(e.audio_bytes or b"") for e in pending) * 8 <= _KEEP_AUDIO_BYTES   # ~x8 decoded vs compressed
    with cf.ThreadPoolExecutor(max_workers=max(1, opts.num_workers)) as pool:
        probed = list(pool.map(lambda e: _probe(e, keep), pending))
    by_key = {(it.example.dataset, it.example.id): it for it in probed}
    own_rows: list[tuple[int, _Loaded, Optional[str]]] = []   # (index, item, failure) labelled on their own
    partitions: dict[tuple[str, int, str], list[Utterance]] = {}
    budget = teacher.max_new - _TOKEN_MARGIN
    for i, item in enumerate(probed):
        e = item.example
        if item.status not in ("ok", "long"):         # failed or no speech: a row of its own
            own_rows.append((i, item, None))
            continue
        lid = teacher.check(e)
        if isinstance(lid, str):
            own_rows.append((i, item, lid))
            continue
        if item.status == "long":                     # over 30 s: a row of its own (long-form)
            own_rows.append((i, item, None))
            continue
        ref = (e.text or "").strip()
        est = math.ceil(_TOKEN_FACTOR * len(teacher.tok.encode(" " + ref))) + _TOKENS_PER_MEMBER if ref else None
        partitions.setdefault((e.dataset, lid, teacher.task(e)), []).append(
            Utterance(e.id, item.duration, e.text, e.speaker, est))
    windows = []                                        # (dataset, language id, Window, task)
    for (dataset, lid, task), utts in partitions.items():
        packing = pack(utts, max_s=opts.pack_max_s, gap_s=opts.pack_gap_s, max_tokens=budget,
                       short_fraction=opts.pack_short)
        windows += [(dataset, lid, w, task) for w in packing.windows]
        # clips longer than --pack-max (and <= 30 s): a window of their own
        windows += [(dataset, lid, w, task) for u in packing.unpacked
                    for w in pack([u], max_s=N_SAMPLES / SAMPLE_RATE, gap_s=opts.pack_gap_s).windows]
    n_batches = math.ceil(len(windows) / global_b)
    n_clips = sum(len(w.members) for _, _, w, _ in windows)
    if is_main_process():
        print(f"dwjax pseudo-label: teacher {opts.teacher}; {n_examples} examples, {n_done} already labelled, "
              f"{len(pending)} to label: {n_clips} packed into {len(windows)} windows of <= {opts.pack_max_s:g} s "
              f"(gap {opts.pack_gap_s:g} s), {len(own_rows)} on their own; {n_batches} global batches of "
              f"{global_b} ({opts.batch_size} per device x {n_dev} devices, {n_local} rows per process x "
              f"{n_proc} processes)", flush=True)

    counts = dict.fromkeys(_TOTALS, 0)
    counts["audio_s"] = 0.0
    part_index = _next_part_index(output, proc, n_proc)
    local_cache: dict = {}
    bar = None
    if is_main_process() and opts.progress and (n_batches or own_rows):
        from tqdm import tqdm
        bar = tqdm(total=len(windows) + len(own_rows), unit="window", dynamic_ncols=True, file=sys.stderr,
                   desc="pseudo-label --pack")

    def account(rows: list[dict]) -> None:
        for r in rows:
            counts["rows"] += 1
            if r["members"]:
                counts["windows"] += 1
                counts["packed_clips"] += len(json.loads(r["members"]))
            if r["status"] == "ok":
                counts["ok"] += 1
                counts["audio_s"] += _speech_seconds(r)
            elif is_failure(r["status"]):
                counts["failed"] += 1
                _report_failure(r, bar)

    # 2. rows of their own (failed / silent / unknown language / long-form), round-robin over processes
    buffer: list[dict] = []
    for i, item, failure in own_rows:
        if i % n_proc != proc:
            continue
        if failure is not None:
            buffer.append(_base_row(item.example, item.duration, failure))
        elif item.status == "long":
            buffer.append(_long_row(teacher, opts, item, local_cache))
        else:
            buffer.append(_base_row(item.example, item.duration, item.status))
    account(buffer)
    if bar is not None:
        bar.update(len(own_rows))

    # 3. the windows: global batch g holds windows [g*B, (g+1)*B), this process decodes rows [lo, hi) of it
    def window_row(dataset: str, language: Optional[str], w, ids: list[int], avg_lp: float, nsp: float,
                   task: str, prob: Optional[float] = None) -> dict:
        members = [by_key[(dataset, m)].example for m in w.ids]
        e = Example(id=w.id, dataset=dataset, text=w.reference, language=members[0].language,
                    encoding_errors=any(m.encoding_errors for m in members))
        text = teacher.tok.decode(ids).strip()
        segs = teacher.tok.segments(ids, duration=w.duration_s)
        row = _label_row(e, w.duration_s, text, ids, language, avg_lp, nsp, segs, task, prob,
                         teacher.language_source(e))
        row.update(members=members_json(w, {m.id: {"audio": m.audio_path} for m in members}), source=w.source)
        if any(m.audio_bytes is not None for m in members):      # the loader cannot read these clips again
            row.update(member_audio_bytes=[m.audio_bytes for m in members])
        return row

    def decode_split(dataset: str, lid: int, w, audio: np.ndarray, task: str) -> list[dict]:
        """A window whose decoding reached the budget: its halves (recursively), on the local device."""
        language = teacher.code_of.get(lid) if lid >= 0 else None
        if len(w.members) == 1:
            ids, avg_lp, nsp = _local_decode(teacher, opts, local_cache, audio, language, task)[:3]
            row = window_row(dataset, language or "en", w, ids, avg_lp, nsp, task)
            if looped(teacher, ids):
                return [runaway_row(row, len(ids), w.duration_s)]
            counts["token_limit_truncated"] += 1
            return [row]
        counts["token_limit_splits"] += 1
        half = len(w.members) // 2
        rows = []
        for part in (w.members[:half], w.members[half:]):
            utts = [Utterance(m.id, m.duration_s, by_key[(dataset, m.id)].example.text, w.source) for m in part]
            sub = pack(utts, max_s=N_SAMPLES / SAMPLE_RATE, gap_s=opts.pack_gap_s).windows
            assert len(sub) == 1, "a half of a packed window must pack into one window"
            sub_w = sub[0]
            start = int(round(part[0].offset_s * SAMPLE_RATE))
            sub_audio = audio[start: start + int(round(sub_w.duration_s * SAMPLE_RATE))]
            ids, avg_lp, nsp, hit, lang = _local_decode(teacher, opts, local_cache, sub_audio, language, task)
            if hit and looped(teacher, ids):
                rows.append(runaway_row(window_row(dataset, language or lang or "en", sub_w, ids, avg_lp, nsp, task),
                                        len(ids), sub_w.duration_s))
            elif hit:
                rows += decode_split(dataset, lid, sub_w, sub_audio, task)
            else:
                rows.append(window_row(dataset, language or lang or "en", sub_w, ids, avg_lp, nsp, task))
        return rows

    def load_window(dataset: str, w) -> tuple[Optional[np.ndarray], Optional[str]]:
        try:
            clips = [_member_audio(by_key[(dataset, m)].example, by_key[(dataset, m)].audio) for m in w.ids]
            return window_audio(w, clips, gap_s=opts.pack_gap_s), None
        except Exception as err:  # a window must never stop the run
            return None, f"unreadable audio: {type(err).__name__}: {err}"

    def rows_of(g: int) -> list:
        start = g * global_b
        return windows[start + lo: min(start + hi, len(windows))]

    with cf.ThreadPoolExecutor(max_workers=max(1, opts.num_workers)) as pool:
        def submit(g: int):
            return [pool.submit(load_window, ds, w) for ds, _, w, _ in rows_of(g)] if g < n_batches else []

        ahead = submit(0)
        for g in range(n_batches):
            current, ahead = ahead, submit(g + 1)
            mine = rows_of(g)
            loaded = [f.result() for f in current]
            audio = np.zeros((n_local, N_SAMPLES), np.float32)
            lang = np.full((n_local,), -1, np.int32)
            task_ids = np.full((n_local,), -1, np.int32)
            for i, ((_, lid, _, task), (a, _)) in enumerate(zip(mine, loaded)):
                if a is not None:
                    audio[i, : len(a)] = a
                    lang[i] = lid
                    task_ids[i] = teacher.task_id(Example(id="", task=task))
            rows: list[dict] = []
            limit = teacher.limits([w.duration_s for _, _, w, _ in mine], n_local)
            if any(a is not None for a, _ in loaded) or n_proc > 1:
                active = np.zeros((n_local,), bool)          # padding and unreadable rows: not encoded
                active[: len(loaded)] = [a is not None for a, _ in loaded]
                out = teacher.run(audio, lang, global_b, task_ids, active, limit)
            for i, ((dataset, lid, w, task), (a, err)) in enumerate(zip(mine, loaded)):
                if a is None:
                    e = Example(id=w.id, dataset=dataset, text=w.reference)
                    row = _base_row(e, w.duration_s, err)
                    row.update(members=members_json(w), source=w.source)
                    rows.append(row)
                    continue
                n = int(out["lengths"][i])
                language = teacher.code_of.get(int(out["language"][i]), "en") if teacher.multilingual else "en"
                ids = out["tokens"][i, :n].tolist()
                # stopped: past its runaway limit, or at the budget with a looping text (never split: a loop
                # decoded again loops again); at the budget otherwise: too much speech, never a truncated window
                stopped = ran_away(teacher, ids, limit[i])
                if n >= teacher.max_new and not stopped:
                    if len(w.members) > 1:
                        rows += decode_split(dataset, lid, w, a, task)
                        continue
                    counts["token_limit_truncated"] += 1     # one clip: labelled as the per-clip path does
                prob = float(out["language_probability"][i]) if teacher.multilingual else None
                row = window_row(dataset, language, w, ids, float(out["sum_logprob"][i]) / (n + 1),
                                 float(out["no_speech_prob"][i]), task, prob)
                rows.append(runaway_row(row, n, w.duration_s) if stopped else row)
            account(rows)
            buffer.extend(rows)
            if buffer and ((g + 1) % opts.commit_every == 0 or g + 1 == n_batches):
                _write_part(output, proc, n_proc, part_index, buffer)
                part_index += 1
                buffer = []
            if bar is not None:   # process 0's clip audio (no gaps), scaled to all processes
                bar.update(min(global_b, len(windows) - g * global_b))
                audio_s = counts["audio_s"] * n_proc
                bar.set_postfix_str(f"~{audio_s / 3600:.3f} h audio, ~{audio_s / max(time.time() - t0, 1e-9):.2f} "
                                    "audio-s/s", refresh=False)
    if buffer:
        _write_part(output, proc, n_proc, part_index, buffer)
    if bar is not None:
        bar.close()
    counts["wall"] = time.time() - t0
    return counts


def _local_decode(teacher: "_Teacher", opts: LabelOptions, cache: dict, audio: np.ndarray,
                  language: Optional[str], task: str) -> tuple[list[int], float, float, bool, Optional[str]]:
    """(tokens, avg_logprob, no_speech_prob, reached the budget, language) of one window on the local device."""
    tr = _local_transcriber(teacher, opts, cache)
    t = tr.transcribe_batch([audio], language=language, task=task, timestamps=True,
                            max_new_tokens=teacher.max_new)[0]
    return list(t.tokens), float(t.avg_logprob), float(t.no_speech_prob), len(t.tokens) >= teacher.max_new, t.language


def _long_row(teacher: "_Teacher", opts: LabelOptions, item: _Loaded, cache: dict) -> dict:
    """The row of a clip over 30 s: long-form decoding where installed, else the reason it has no label."""
    transcribe_long = _long_form()
    if transcribe_long is None:
        reason = f"longer than 30 s: {item.duration:.1f} s, no long-form decoder (dwjax.decoding.longform)"
        return _base_row(item.example, item.duration, reason)
    tr = _local_transcriber(teacher, opts, cache)
    e = item.example
    lid = teacher.language_id(e)
    language = teacher.code_of.get(lid) if isinstance(lid, int) and lid >= 0 else None
    try:
        t = transcribe_long(tr, item.audio, **_decode_kw(opts, language, teacher.task(e)))
        return _transcript_row(e, item.duration, t, opts.timestamps, teacher.task(e), teacher.language_source(e))
    except Exception as err:  # a row must never stop the run
        return _base_row(item.example, item.duration, f"long-form decoding failed: {type(err).__name__}: {err}")


def _speech_seconds(row: dict) -> float:
    """The clip audio of a row: its duration, or for a packed window the sum of its members' (no gaps)."""
    if row.get("members"):
        return sum(m["duration_s"] for m in json.loads(row["members"]))
    return row.get("duration_s") or 0.0


def label_datasets(specs: Sequence[str], opts: LabelOptions, cfg=None, devices=None) -> Optional[dict]:
    """Label every example of the datasets `specs` not yet labelled under `opts.output` (see the module docstring).

    Call `dwjax.mesh.initialize_distributed()` before this in a multi-process run. `cfg` supplies the mesh's
    dcn layout only (the labeller is pure data parallel); `devices` limits the mesh (tests). Returns the summary
    on process 0 and None on the others."""
    import jax

    from dwjax.config import Config, MeshConfig
    from dwjax.mesh import banner, is_main_process, make_mesh

    if opts.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if opts.commit_every < 1:
        raise UserError("--commit-every must be at least 1")
    if opts.num_beams < 1:
        raise UserError("--num-beams must be at least 1")
    if opts.num_beams > 1:
        from dwjax.decoding.generate import Generator
        if not hasattr(Generator, "beam_search"):
            raise UserError("--num-beams > 1 needs beam search (dwjax.decoding.beam), which this install lacks")
    if opts.pack:
        if opts.num_beams > 1:
            raise UserError("--pack decodes greedily; drop --num-beams")
        if not 0 < opts.pack_max_s <= N_SAMPLES / SAMPLE_RATE:
            raise UserError(f"--pack-max must be in (0, 30] seconds, got {opts.pack_max_s:g}")
        if not 0 <= opts.pack_short <= 1:
            raise UserError(f"--pack-short must be a fraction in [0, 1], got {opts.pack_short:g}")
        if not 0 <= opts.pack_gap_s < opts.pack_max_s:
            raise UserError(f"--pack-gap must be >= 0 and below --pack-max, got {opts.pack_gap_s:g}")
        opts = dataclasses.replace(opts, timestamps=True)       # packed windows are labelled with timestamps
    cfg = cfg or Config()
    output = Path(opts.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()

    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1, dcn_data=1), devices)
    n_dev, n_proc, proc = mesh.devices.size, jax.process_count(), jax.process_index()
    global_b = opts.batch_size * n_dev
    banner(dataclasses.replace(cfg, mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
                               train=dataclasses.replace(cfg.train, per_device_batch_size=opts.batch_size),
                               model=dataclasses.replace(cfg.model, dtype=opts.dtype, scan_layers=opts.scan_layers)),
           global_batch=global_b)

    # what is done: every process reads every part, then all agree before anyone writes
    examples = _sorted_examples(specs)
    _check_options(output, opts)
    done = completed_keys(output)
    if is_main_process():
        for stale in output.glob(".labels-*.tmp"):
            stale.unlink(missing_ok=True)
    pending = [e for e in examples if (e.dataset, e.id) not in done]
    if n_proc > 1:
        from jax.experimental import multihost_utils
        multihost_utils.assert_equal(np.array([len(pending), _fingerprint(pending) & 0x7FFFFFFF], np.int32),
                                     "processes disagree on the examples left to label: every process must see "
                                     "the same manifests and the same output directory (a shared file system)")
    # the teacher and the languages are checked before anything is written: a refused run leaves no options behind
    teacher = _Teacher(opts, mesh)
    _check_languages(pending, teacher, report=is_main_process())
    _sync("dwjax-pseudo-label-scan")
    if is_main_process() and not (output / OPTIONS_FILE).exists():
        tmp = output / f".{OPTIONS_FILE}.tmp"
        tmp.write_text(json.dumps({**opts.fixed(), "datasets": [str(s) for s in specs]}, indent=2) + "\n",
                       encoding="utf-8")
        os.replace(tmp, output / OPTIONS_FILE)

    lo, hi = local_row_range(teacher.batch_sharding, global_b)
    runner = _run_packed if opts.pack else _run_per_clip
    local = runner(pending, opts, teacher, output, proc, n_proc, lo, hi, global_b, len(examples), len(done), n_dev)
    wall = local["wall"]
    totals = np.array([local.get(k, 0) for k in _TOTALS], np.float64)
    if n_proc > 1:
        from jax.experimental import multihost_utils
        totals = np.asarray(multihost_utils.process_allgather(totals)).reshape(n_proc, -1).sum(axis=0)
    _sync("dwjax-pseudo-label-done")
    if not is_main_process():
        return None
    run = {"processes": n_proc, "devices": n_dev, "global_batch": global_b, "per_device_batch": opts.batch_size,
           "rows_this_run": int(totals[1]), "labelled_this_run": int(totals[2]), "failed_this_run": int(totals[3]),
           "audio_hours_this_run": float(totals[0]) / 3600, "wall_s": wall, "total_s": time.time() - started,
           "audio_s_per_s": float(totals[0]) / wall if wall > 0 else None}
    if opts.pack:
        run.update({f"{k}_this_run" if k in ("windows", "packed_clips") else k: int(totals[i])
                    for i, k in enumerate(_TOTALS) if i >= 4})
    summary = summarise(read_labels(output, columns=SUMMARY_COLUMNS), run=run, options=opts.fixed())
    tmp = output / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, output / SUMMARY_FILE)
    print(format_summary(summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------------- summary


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    return float(np.percentile(np.asarray(sorted_values, np.float64), q)) if sorted_values else float("nan")


def _group_summary(rows: list[dict]) -> dict:
    from dwjax.text.wer import error_rates
    ok = [r for r in rows if r["status"] == "ok"]
    with_ref = [r for r in ok if r["reference"] is not None]
    scored = sorted(r["wer"] for r in ok if r["wer"] is not None)
    statuses: dict[str, int] = {}
    no_speech = runaway = 0
    for r in rows:
        if status_kind(r["status"]) == NO_SPEECH:
            no_speech += 1
        elif status_kind(r["status"]) == RUNAWAY:
            runaway += 1
        elif r["status"] != "ok":
            key = status_kind(r["status"])
            statuses[key] = statuses.get(key, 0) + 1
    # each pair normalised the way its language is scored (English for translations; dwjax.text.languages)
    from dwjax.text.languages import normalizer, score
    norms = [normalizer(_safe_language(_scored_language(r.get("language"), r.get("task")))) for r in with_ref]
    corpus = error_rates([n(r["reference"]) for n, r in zip(norms, with_ref)],
                         [n(r["text"]) for n, r in zip(norms, with_ref)], normalize=False) if with_ref else None
    by_language: dict[tuple, list[dict]] = {}
    for r in ok:
        by_language.setdefault((r.get("language") or "en", r.get("task") or "transcribe"), []).append(r)
    languages = {}
    for (lang, task), group in sorted(by_language.items()):
        refd = [r for r in group if r["reference"] is not None]
        scored_as = _safe_language(_scored_language(lang, task))
        rates = score(scored_as, [r["reference"] for r in refd], [r["text"] for r in refd]) if refd else None
        languages[f"{lang}/{task}"] = {
            "ok": len(group), "metric": rates["metric"] if rates else None,
            "corpus": None if rates is None or math.isnan(rates["rate"]) else rates["rate"],
            "detected": sum(r.get("language_source") == "detected" for r in group)}
    out = {
        "rows": len(rows), "ok": len(ok), "no_speech": no_speech, "runaway": runaway,
        "failed": len(rows) - len(ok) - no_speech - runaway,
        "audio_hours": sum(_speech_seconds(r) for r in ok) / 3600,
        "windows": sum(bool(r.get("members")) for r in rows),
        "packed_clips": sum(len(json.loads(r["members"])) for r in rows if r.get("members")),
        "with_reference": len(with_ref), "empty_references": len(with_ref) - len(scored),
        "no_reference": len(ok) - len(with_ref),
        "reference_encoding_errors": sum(bool(r["reference_encoding_errors"]) for r in rows),
        "failures": dict(sorted(statuses.items())),
        "wer": None, "kept": None, "languages": languages,
    }
    if scored:
        out["wer"] = {"corpus": None if corpus is None or math.isnan(corpus["wer"]) else corpus["wer"],
                      "mean": statistics.fmean(scored), "median": statistics.median(scored),
                      **{f"p{q}": _percentile(scored, q) for q in (10, 25, 75, 90, 95)}, "max": scored[-1]}
    if with_ref:
        # kept = labelled rows whose normalised reference is non-empty and WER% <= threshold, over labelled rows
        out["kept"] = {str(t): sum(w * 100 <= t for w in scored) / len(ok) for t in THRESHOLDS}
    return out


def summarise(table, run: Optional[dict] = None, options: Optional[dict] = None) -> dict:
    """Per-dataset and overall statistics of a label table (see `read_labels`)."""
    cols = [c for c in SUMMARY_COLUMNS if c != "id"]
    rows = table.select(cols).to_pylist()
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["dataset"], []).append(r)
    ids = table.select(["dataset", "id"]).to_pylist()
    duplicates = len(ids) - len({(r["dataset"], r["id"]) for r in ids})
    return {"options": options or {}, "run": run or {}, "thresholds_percent": list(THRESHOLDS),
            "duplicates": duplicates, "overall": _group_summary(rows),
            "datasets": {name: _group_summary(group) for name, group in sorted(by.items())}}


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def format_summary(summary: dict) -> str:
    """The summary as a plain-text table (one line per dataset, then the total)."""
    run = summary.get("run") or {}
    head = (f"{'dataset':<20} {'rows':>7} {'ok':>7} {'failed':>6} {'hours':>8} {'WER%':>6} {'mean':>6} {'med':>6} "
            f"{'p90':>6} " + " ".join(f"{'<=' + str(t):>6}" for t in THRESHOLDS))
    lines = []
    if run:
        rate = run.get("audio_s_per_s")
        lines.append(f"labelled {run.get('labelled_this_run', 0)} of {run.get('rows_this_run', 0)} rows this run: "
                     f"{run.get('audio_hours_this_run', 0.0):.4f} h of audio in {run.get('wall_s', 0.0):.1f} s "
                     f"({'-' if rate is None else f'{rate:.2f}'} audio s/s) on {run.get('processes')} process(es), "
                     f"{run.get('devices')} device(s), global batch {run.get('global_batch')}")
    lines += [head, "-" * len(head)]
    groups = list(summary["datasets"].items()) + [("TOTAL", summary["overall"])]
    for name, s in groups:
        w, kept = s["wer"] or {}, s["kept"] or {}
        lines.append(f"{name[:20]:<20} {s['rows']:>7} {s['ok']:>7} {s['failed']:>6} {s['audio_hours']:>8.4f} "
                     f"{_pct(w.get('corpus')):>6} {_pct(w.get('mean')):>6} {_pct(w.get('median')):>6} "
                     f"{_pct(w.get('p90')):>6} " + " ".join(f"{_pct(kept.get(str(t))):>6}" for t in THRESHOLDS))
    o = summary["overall"]
    lines.append(f"WER in %; '<=T': fraction (%) of labelled rows kept by a WER <= T% filter; "
                 f"{o['empty_references']} empty reference(s), {o['no_reference']} without reference, "
                 f"{o['reference_encoding_errors']} with non-UTF-8 reference text")
    if o.get("windows"):
        lines.append(f"packed: {o['packed_clips']} clips in {o['windows']} windows (one row each; 'hours' counts "
                     "clip audio, not gaps)" + (f"; {run.get('token_limit_splits', 0)} windows split at the token "
                     f"budget, {run.get('token_limit_truncated', 0)} single clips reached it" if run else ""))
    for name, s in summary["datasets"].items():
        langs = s.get("languages") or {}
        if any(not key.startswith("en/") or not key.endswith("/transcribe") for key in langs):
            lines.append(f"{name} by language/task: " + "; ".join(
                f"{key} {v['ok']} ok" + (f", {(v['metric'] or 'wer').upper()} {_pct(v['corpus'])} %"
                                         if v["corpus"] is not None else "")
                + (f" ({v['detected']} detected)" if v["detected"] else "") for key, v in langs.items()))
    if o.get("no_speech"):
        lines.append(f"no-speech rows (no label, not failures): {o['no_speech']}")
    if o.get("runaway"):
        lines.append(f"runaway rows (the teacher looped; stopped, no label, not failures): {o['runaway']}")
    if o["failures"]:
        lines.append("failed rows: " + "; ".join(f"{n} x {reason}" for reason, n in o["failures"].items()))
    if summary.get("duplicates"):
        lines.append(f"WARNING: {summary['duplicates']} duplicate (dataset, id) rows in the part files")
    return "\n".join(lines)
