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

Rows that cannot be labelled (missing / corrupt / truncated / empty audio, a clip over 30 s whose long-form
decoding failed, an unknown language) are written with `status` = the reason and no label; `status == "ok"` marks
a label. Each is named on stderr as it is written; the run goes on, and `dwjax pseudo-label` exits 1 at the end
when the output holds any such failed row. Rows without speech get status "no speech: <why>" and no label either
(a teacher labels digital silence "you"; on data without references that label would reach training): audio whose
peak amplitude is below `dwjax.audio.SILENCE_PEAK` (never decoded), or a <= 30 s clip whose teacher no-speech
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

import dataclasses
import json
import os
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from dwjax.audio import N_SAMPLES, SAMPLE_RATE
from dwjax.config import Config, MeshConfig
from dwjax.data.label_store import PART_GLOB, SCHEMA, completed_keys, part_files, read_labels
from dwjax.data.manifest import Example, read_dataset
from dwjax.errors import UserError
from dwjax.mesh import banner, is_main_process, make_mesh
from dwjax.pseudo_label.options import OPTIONS_FILE, LabelOptions, check_options
from dwjax.pseudo_label.packed import _TOTALS, _run_packed
from dwjax.pseudo_label.per_clip import _run_per_clip
from dwjax.pseudo_label.rows import FAILURE_KINDS, NO_SPEECH, is_failure, runaway_limit, status_kind
from dwjax.pseudo_label.summary import SUMMARY_COLUMNS, SUMMARY_FILE, THRESHOLDS, format_summary, summarise
from dwjax.pseudo_label.teacher import Teacher, _check_languages, local_row_range

# the package is split by concern (docs/DESIGN.md): options, rows, teacher, the two runs (per_clip, packed) and
# summary; here the run itself. The part files are the data layer's label store (dwjax/data/label_store.py).
# Besides __all__, `runaway_limit` stays importable from dwjax.pseudo_label.

__all__ = ["LabelOptions", "label_datasets", "read_labels", "completed_keys", "part_files", "summarise",
           "format_summary", "SCHEMA", "THRESHOLDS", "PART_GLOB", "FAILURE_KINDS", "NO_SPEECH", "is_failure",
           "status_kind"]


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
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _fingerprint(pending: list[Example]) -> int:
    h = 0
    for e in pending:
        h = zlib.crc32(f"{e.dataset}\x00{e.id}\n".encode("utf-8", "surrogatepass"), h)
    return h


def label_datasets(specs: Sequence[str], opts: LabelOptions, cfg=None, devices=None) -> Optional[dict]:
    """Label every example of the datasets `specs` not yet labelled under `opts.output` (see the module docstring).

    Call `dwjax.mesh.initialize_distributed()` before this in a multi-process run. `cfg` supplies the mesh's
    dcn layout only (the labeller is pure data parallel); `devices` limits the mesh (tests). Returns the summary
    on process 0 and None on the others."""
    if opts.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if opts.commit_every < 1:
        raise UserError("--commit-every must be at least 1")
    if opts.num_beams < 1:
        raise UserError("--num-beams must be at least 1")
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
    check_options(output, opts)
    done = completed_keys(output)
    if is_main_process():
        for stale in output.glob(".labels-*.tmp"):
            stale.unlink(missing_ok=True)
    pending = [e for e in examples if (e.dataset, e.id) not in done]
    if n_proc > 1:
        multihost_utils.assert_equal(np.array([len(pending), _fingerprint(pending) & 0x7FFFFFFF], np.int32),
                                     "processes disagree on the examples left to label: every process must see "
                                     "the same manifests and the same output directory (a shared file system)")
    # the teacher and the languages are checked before anything is written: a refused run leaves no options behind
    teacher = Teacher(opts, mesh)
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
