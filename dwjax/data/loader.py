"""Training batches for distillation: pseudo-labelled audio -> (features, decoder inputs, labels, loss mask).

Order. The stream is a pure function of (seed, step): global row g = step * global_batch + r picks a dataset by
its weight (a generator seeded with (seed, g)), then the element at position g mod N_d of that dataset's
permutation for epoch g // N_d. With one dataset this is an exact epoch-by-epoch shuffle. Nothing is carried
between steps, so resuming at step s (on any number of processes) continues the same global stream. The per-row
randomness (timestamps kept or not, previous-text prompt or not) comes from a generator seeded with (seed, g, 2).

Sharing. Process p of P builds rows [p * B/P, (p+1) * B/P) of every global batch of B rows.

Rows. A per-clip row (`audio` a path, or for a clip held as bytes `audio` null and `audio_bytes` its encoded file)
is its clip padded to 30 s. A packed row (`dwjax pseudo-label --pack`: `audio` null, `members` a JSON list of
{"id", "offset_s", "duration_s", "audio"}, and for members held as bytes `member_audio_bytes`, their files in member
order) is its window, built by `dwjax.data.packing.window_audio` from the members' audio at their offsets (zeros
between them), padded to 30 s. Labels written before the byte columns existed read as before (paths).
`speech_s` of a row is its clip's length, or the sum of its members' durations (the gaps are not speech).

Labels. A sequence is [<|startofprev|> prev...] + SOT [lang task] [<|notimestamps|>] + teacher tokens + EOT.
For a multilingual teacher, `lang` and `task` are the row's own: the `language` and `task` columns the labeller
wrote (the language it was given or detected, transcribe / translate), unless the training set's config names a
`language` or `task` for all its rows (`read_labelled(language=..., task=...)`); rows of labels made before the
`task` column existed are transcriptions. English-only teachers have neither token.
decoder_input_ids = seq[:-1], labels = seq[1:], loss_mask = 1 where the label is a teacher token or EOT, and, for a
multilingual teacher, where it is the language token (SOT predicts it, as in Whisper's and distil-whisper's training:
the student learns to detect the language, from the teacher's distribution through the KL); the previous-text
prompt, the task and <|notimestamps|> tokens (forced at inference) and the padding are masked. Labels with timestamps keep them with
probability `timestamp_probability`; otherwise they are stripped and <|notimestamps|> is forced. A per-clip label
is stripped by dropping its timestamp tokens (as before); a packed label holds several segments, so its plain form
is its segments' texts, each stripped, joined with one space and tokenised again (" " + text): the same tokens the
teacher gives one recording without timestamps, never two segments glued without their space.

Previous window (packed rows only). The previous window of a packed row W is the packed row W' of the same label
directory with the same `dataset`, `source` and `language` whose first member comes just before W's in the
labeller's order (member ids sorted as strings, `dwjax pseudo-label` packs in (dataset, id) order) and whose last
member precedes W's first member: consecutive windows of one speaker. It is used only when W' itself passed the
label filters (a dropped label is not trusted as context). With probability `prev_context_probability` (drawn for
every row that has a previous window) the sequence starts with <|startofprev|> + W''s plain text tokens (no
timestamps, as Whisper's text prompts), cut from the left to at most 223 tokens (Whisper's n_text_ctx // 2 - 1,
which dwjax's long-form decoding also uses) and to what still fits the label length; the prompt is masked out of
the loss. Per-clip rows have no previous window.

Run-on windows (`data.run_on_fraction`, packed rows only). Packed windows hold whole utterances and end in
silence, but in sequential long-form decoding every window but the last is 30 s of speech cut mid-utterance: a
student that never saw speech past its windows' length (<= 24 s by default) or a cut utterance loops there
(README: Paper scale, run-on windows). So a fraction of the packed rows that have a next window W' (the row whose previous
window they are) run on: the row's audio is W followed, after the gap between W's members (0.5 s for a
one-member window), by W''s members cut at 30 s; its label is W's label, then W''s segments that end before the cut
(their timestamps shifted by W''s offset, text tokens unchanged) and, when the cut falls inside speech, the start
timestamp of the cut segment alone: Whisper's form for an utterance that continues in the next window (the
sequential decoder seeks there). A W' segment counts as whole when its end timestamp is at most the cut member's
start (the cut, when no member is cut). Run-on rows always train with timestamps (without them the cut words
would have no label). Which rows run on is a function of (data.seed, the row's cache key), so the rows, and an
encoder cache of them, are the same every epoch; a run-on row's cache key is `<key>><next window's id>`. A row
runs on only when its label ends with a segment's end timestamp, at least 1 s of W' fits and the longer label
stays within max_label_length.

Length. Each batch is padded to its longest sequence rounded up to a multiple of `data.label_bucket` (default 64;
at most the run's label length, `label_length`), so a run compiles its step once per bucket it meets (<= 7 at 448
tokens with 64); `label_bucket: 0` pads every batch to the run's label length (one compile, the old behaviour).
Padding is masked: the loss does not depend on it (tests/test_packed_training.py). With length padding a batch
also carries `target_positions` (b, k): each row's unmasked positions in order, then repeats of one of its masked
positions, k = its largest count rounded up to a quarter of the padded length (`target_positions`). The step
computes logits only there: the vocabulary projection (51865 x d_model per position, teacher and student) is
most of a cached step's work, and a packed row's previous-text prompt and padding have no loss. At most four k
per padded length, so at most four compiles per bucket.

Encoder cache. With `encoder_cache` (dwjax/data/encoder_cache.py) a batch carries `encoder_out` (the teacher
encoder's output for its rows, float16/bfloat16, read from the cache) instead of audio, and no audio is decoded.

Filtering. `read_labelled` keeps the labels `dwjax/data/label_filter.py` passes (WER with a reference, the teacher's
confidence without) and no longer than max_label_length.
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import functools
import glob
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from dwjax.audio import N_SAMPLES, SAMPLE_RATE, load_audio, load_audio_bytes
from dwjax.data.label_filter import LabelFilter, format_counts, judge, new_counts
from dwjax.data.label_store import read_part
from dwjax.data.packing import DEFAULT_GAP_S, MAX_WINDOW_S, Member, Window, keyed_uniform, window_audio
from dwjax.errors import UserError
from dwjax.text.languages import resolve_language
from dwjax.text.tokenizer import TIME_PRECISION


@dataclasses.dataclass
class LabelledSet:
    name: str
    ids: list[str]
    audio: list            # path (str) or bytes per row; None for a packed row
    tokens: list[list[int]]
    language: list[Optional[str]]
    weight: float = 1.0
    members: list = None   # per row: None (a clip) or the packed window's members [{"id", "offset_s", ...}]
    plain: list = None     # per row: None (strip timestamp tokens) or the packed label's plain-text tokens
    prev: list = None      # per row: index of its previous window in this set (module docstring), or -1
    speech_s: list = None  # per row: seconds of speech (None: unknown until the audio is decoded)
    datasets: list = None  # per row: the `dataset` column (None when absent)
    durations: list = None  # per row: the `duration_s` column (None when absent)
    task: list = None      # per row: "transcribe" / "translate" (None: transcribe)
    member_bytes: list = None  # per row: None, or (packed rows) each member's encoded file (None: read its path)
    run_on: list = None    # per row: None, or the id of the next window its audio runs on into (`run_on_windows`)

    def __post_init__(self):
        n = len(self.ids)
        for f in ("members", "plain", "speech_s", "datasets", "durations", "task", "member_bytes", "run_on"):
            if getattr(self, f) is None:
                setattr(self, f, [None] * n)
        if self.prev is None:
            self.prev = [-1] * n

    def __len__(self):
        return len(self.ids)

    def set_tokenizer(self, tok) -> None:
        """Computes the plain-text form of every packed label (module docstring: Labels)."""
        for i, mem in enumerate(self.members):
            if mem is not None and self.plain[i] is None:
                self.plain[i] = _plain_tokens(tok, self.tokens[i])

    def key(self, i: int) -> str:
        """The row's key in an encoder cache: `dataset/id` (the id alone without a dataset column)."""
        d = self.datasets[i]
        key = f"{d}/{self.ids[i]}" if d else str(self.ids[i])
        return key if self.run_on[i] is None else f"{key}>{self.run_on[i]}"


def read_labelled(name: str, path: str, rule: LabelFilter | float | None = LabelFilter(), weight: float = 1.0,
                  max_label_length: int = 448, tokenizer=None, language: Optional[str] = None,
                  task: Optional[str] = None) -> tuple[LabelledSet, dict]:
    """Reads a pseudo-label directory (or parquet file) and filters its labels (`dwjax/data/label_filter.py`: the
    WER filter on rows with a reference, the teacher's confidence on rows without). `rule` is a LabelFilter, or
    a WER threshold in % (None = off) with the default confidence filter. Returns the set and the counts of
    `label_filter.new_counts` (kept, and dropped by reason) for the report. Packed rows need `tokenizer` (their
    plain-text form, module docstring); without one they are stripped of timestamp tokens like clips.
    `language` / `task`: the prompt's language and task for every row of the set (None: each row's own)."""
    if task is not None and task not in ("transcribe", "translate"):
        raise UserError(f"data.train {name}: task must be transcribe or translate, not {task!r}")
    if language is not None:
        language = resolve_language(language)
    if not isinstance(rule, LabelFilter):
        rule = LabelFilter(wer_threshold=rule)
    files = _label_files(path)
    table = [row for f in files for row in _read_part(f)]
    table.sort(key=lambda r: str(r["id"]))
    counts = new_counts()
    counts["total"] = len(table)
    ids, audio, tokens, langs, members, plain, speech, dsets, durs, tasks = [], [], [], [], [], [], [], [], [], []
    member_bytes = []
    windows: dict = {}          # (dataset, source, language) -> [(first member id, last member id, row index)]
    for row in table:
        reason = judge(row, rule, counts)
        if reason is None:
            toks = list(row["token_ids"])
            if len(toks) + 5 > max_label_length:
                reason = "dropped_long"
        mem = json.loads(row["members"]) if row.get("members") else None
        if mem:
            key = (row.get("dataset"), row.get("source"), row.get("language"))
            windows.setdefault(key, []).append((str(mem[0]["id"]), str(mem[-1]["id"]),
                                                len(ids) if reason is None else -1))
        if reason is not None:
            counts[reason] += 1
            continue
        src = None if mem else (row.get("audio_bytes") or row["audio"])
        if not mem and not src:
            raise UserError(f"{path}: row {row['id']} has no audio (no path, no audio_bytes): labels of audio held "
                            f"as bytes made before dwjax kept the bytes; relabel with `dwjax pseudo-label`")
        ids.append(str(row["id"]))
        audio.append(src)
        tokens.append(toks)
        langs.append(language or row.get("language"))
        tasks.append(task or row.get("task") or "transcribe")
        members.append(mem)
        dsets.append(row.get("dataset"))
        durs.append(row.get("duration_s"))
        if mem:
            held = row.get("member_audio_bytes") or [None] * len(mem)
            if len(held) != len(mem):
                raise UserError(f"{path}: packed row {row['id']} has {len(mem)} members but {len(held)} "
                                f"member_audio_bytes (relabel with `dwjax pseudo-label --pack`)")
            missing = [m["id"] for m, b in zip(mem, held) if not m.get("audio") and not b]
            if missing:
                raise UserError(f"{path}: packed row {row['id']} has no audio (no path, no member_audio_bytes) for "
                                f"member {missing[0]} (relabel with `dwjax pseudo-label --pack`)")
            member_bytes.append(held if any(b for b in held) else None)
            speech.append(float(sum(float(m["duration_s"]) for m in mem)))
            plain.append(_plain_tokens(tokenizer, toks) if tokenizer is not None else None)
        else:
            speech.append(None)
            plain.append(None)
            member_bytes.append(None)
    prev = [-1] * len(ids)
    for group in windows.values():
        group.sort()
        for (first0, last0, i0), (first1, _, i1) in zip(group, group[1:]):
            if i1 >= 0 and i0 >= 0 and last0 < first1:
                prev[i1] = i0
    counts["kept"] = len(ids)
    if not ids:
        raise UserError(f"{path}: no training examples left after the label filters "
                        f"({format_counts(name, counts, rule)})")
    return LabelledSet(name, ids, audio, tokens, langs, weight, members, plain, prev, speech, dsets, durs,
                       tasks, member_bytes), counts


def _plain_tokens(tok, tokens: list[int]) -> list[int]:
    """A packed label without timestamps: its segments' texts, stripped, joined by one space, tokenised again."""
    segs = tok.segments(tokens)
    text = " ".join(t for t in (s["text"].strip() for s in segs) if t)
    return tok.encode(" " + text) if text else []


#: the least of the next window a run-on row must hold (seconds)
MIN_RUN_ON_S = 1.0


def run_on_windows(s: LabelledSet, fraction: float, seed: int, tok, max_label_length: int = 448) -> int:
    """Makes about `fraction` of s's packed rows run on into their next window (module docstring: Run-on windows);
    returns how many did. Call after `set_tokenizer` (a run-on row keeps its own plain text, the next window's
    previous-text prompt)."""
    if fraction <= 0:
        return 0
    members, tokens, held = list(s.members), list(s.tokens), list(s.member_bytes)     # before any run-on
    n = 0
    for j, i in enumerate(s.prev):
        if i < 0 or members[i] is None or members[j] is None or s.run_on[i] is not None:
            continue
        if keyed_uniform(seed, s.key(i), "run-on") >= fraction:
            continue
        joined = run_on_label(tok, members[i], tokens[i], members[j], tokens[j])
        if joined is None or len(joined[1]) + 5 > max_label_length:
            continue
        mem, s.tokens[i], speech = joined
        s.members[i] = mem
        own = held[i] or [None] * len(members[i])
        more = (held[j] or [None] * len(members[j]))[: len(mem) - len(members[i])]
        s.member_bytes[i] = own + more if any(b for b in own + more) else None
        s.speech_s[i] = float(sum(float(m["duration_s"]) for m in members[i])) + speech
        s.run_on[i] = s.ids[j]
        n += 1
    return n


def run_on_label(tok, members: list[dict], tokens: list[int], next_members: list[dict], next_tokens: list[int]):
    """(members, tokens, seconds of the next window's speech inside) of a window that runs on into the next one,
    cut at 30 s (module docstring: Run-on windows), or None when it cannot run on."""
    tb, eot = tok.timestamp_begin, tok.eot
    if len(tokens) < 2 or tokens[-1] < tb or tokens[-2] >= tb:
        return None                                     # the label must end with a segment's end timestamp
    ends = [float(m["offset_s"]) + float(m["duration_s"]) for m in members]
    gap = float(members[1]["offset_s"]) - ends[0] if len(members) > 1 else DEFAULT_GAP_S
    offset = max(ends) + gap
    room = MAX_WINDOW_S - offset                        # seconds of the next window that fit
    if room < MIN_RUN_ON_S:
        return None
    inside = [m for m in next_members if float(m["offset_s"]) < room]
    cut = [float(m["offset_s"]) for m in inside if float(m["offset_s"]) + float(m["duration_s"]) > room]
    bound = cut[0] if cut else room                     # a segment ending by here is whole inside the window
    shift = round(offset / TIME_PRECISION)
    last_ts = tb + round(MAX_WINDOW_S / TIME_PRECISION)
    out, start, run, lone = [], None, [], None
    for t in [*next_tokens, None]:                     # None: the end (text after the last timestamp is unended)
        if t is not None and t < tb:
            if t < eot:
                run.append(t)
            continue
        if not run:
            start = t                                   # a segment opens (or a pair's second timestamp)
            continue
        begin = out[-1] - shift if start is None and out else (tb if start is None else start)
        if t is None or (t - tb) * TIME_PRECISION > bound:
            if (begin - tb) * TIME_PRECISION < room:
                lone = (begin - tb) * TIME_PRECISION    # a segment the cut falls into (or one past the whole members)
            break
        out += [begin + shift, *run, t + shift]
        start, run = None, []
    if cut:
        lone = cut[0] if lone is None else min(lone, cut[0])
    if lone is not None:
        floor = out[-1] if out else tokens[-1]
        out.append(min(last_ts, max(floor, tb + round((lone + offset) / TIME_PRECISION))))
    if not out:
        return None
    shifted = [{**m, "offset_s": float(m["offset_s"]) + offset} for m in inside]
    speech = sum(min(float(m["duration_s"]), room - float(m["offset_s"])) for m in inside)
    return list(members) + shifted, list(tokens) + out, speech


#: columns `read_labelled` needs (the pseudo-labeller writes these and more: SCHEMA in dwjax/data/label_store.py)
REQUIRED_COLUMNS = ("id", "audio", "token_ids")
_MANIFEST_SUFFIXES = (".jsonl", ".json", ".tsv", ".csv", ".txt")


def _pseudo_label_hint(path: str) -> str:
    return (f"data.train needs the output directory of `dwjax pseudo-label` (parquet label files), not a manifest: "
            f"run `dwjax pseudo-label --teacher TEACHER --data {path} --output LABELS` and pass path: LABELS")


def _label_files(path: str) -> list[str]:
    """The parquet files of a pseudo-label directory (or the one file given); UserError for anything else."""
    if not os.path.exists(path):
        raise UserError(f"data.train path {path} does not exist (expected the output directory of "
                        f"`dwjax pseudo-label`)")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if not files:
            manifests = sorted(f for f in os.listdir(path) if f.endswith(_MANIFEST_SUFFIXES))
            extra = f" (it holds {', '.join(manifests[:3])}: a dataset, not labels)" if manifests else ""
            raise UserError(f"{path}: no pseudo-label parquet files{extra}; run `dwjax pseudo-label --teacher "
                            f"TEACHER --data MANIFEST --output {path}` first")
        return files
    if path.endswith(_MANIFEST_SUFFIXES) or _looks_like_text(path):
        raise UserError(f"{path} is a manifest: {_pseudo_label_hint(path)}")
    return [path]


def _looks_like_text(path: str) -> bool:
    """A file that starts with `{` or printable text and is not parquet (parquet files start with PAR1)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head != b"PAR1" and head[:1] in (b"{", b"[")


def _read_part(file: str) -> list[dict]:
    """One label file's rows through the label store (a foreign file is a UserError naming it, with the hint)."""
    return read_part(file, required=REQUIRED_COLUMNS, hint=_pseudo_label_hint(file)).to_pylist()


def row_source(sets: Sequence[LabelledSet], seed: int, g: int) -> tuple[int, int]:
    """(dataset index, element index) of global row g: a pure function of (seed, g)."""
    if len(sets) == 1:
        d = 0
    else:
        w = np.array([s.weight for s in sets], np.float64)
        d = int(np.random.default_rng([seed, g, 1]).choice(len(sets), p=w / w.sum()))
    n = len(sets[d])
    epoch, pos = divmod(g, n)
    return d, int(_permutation(seed, d, epoch, n)[pos])


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, d: int, epoch: int, n: int) -> np.ndarray:
    """Dataset d's order in `epoch` (cached: a batch's rows share one or two epochs; without the cache every row
    drew an O(N) permutation, B x N work per step)."""
    perm = np.random.default_rng([seed, d, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


#: longest previous-text prompt (Whisper's n_text_ctx // 2 - 1, as dwjax/decoding/longform.py)
MAX_PREV_TOKENS = 223


class LabelEncoder:
    """Builds (decoder_input_ids, labels, loss_mask) from teacher token ids (module docstring: Labels)."""

    def __init__(self, tokenizer, length: int, timestamp_probability: float, task: str = "transcribe",
                 prev_context_probability: float = 0.0):
        self.tok, self.length, self.p_ts, self.task = tokenizer, length, timestamp_probability, task
        self.p_prev = prev_context_probability

    def encode(self, tokens: list[int], language: Optional[str], rng: np.random.Generator,
               plain: Optional[list[int]] = None, prev: Optional[list[int]] = None,
               task: Optional[str] = None, timestamped: bool = False) -> tuple[list[int], int]:
        """(the full sequence, cut to length + 1 tokens, and its prompt length). `plain`: the label's form without
        timestamps (None: drop its timestamp tokens); `prev`: the previous window's plain tokens (None: no
        previous window); `task`: the row's task (None: the encoder's); `timestamped`: keep the timestamps
        whatever the draw (run-on rows). The generator draws once for timestamps (when the label has some), then
        once for the prompt (when there is a previous window and prev_context_probability > 0)."""
        tb = self.tok.timestamp_begin
        has_ts = any(t >= tb for t in tokens)
        use_ts = has_ts and (rng.random() < self.p_ts or timestamped)
        if not use_ts:
            tokens = list(plain) if plain is not None and has_ts else [t for t in tokens if t < tb]
        lang = (language or "en") if self.tok.is_multilingual else None
        prompt = self.tok.sot_sequence(lang, (task or self.task) if self.tok.is_multilingual else None, use_ts)
        if prev is not None and self.p_prev > 0 and rng.random() < self.p_prev:
            room = min(MAX_PREV_TOKENS, self.length + 1 - len(prompt) - len(tokens) - 1 - 1)
            if room > 0 and prev:
                prompt = [self.tok.sot_prev] + list(prev[-room:]) + prompt
        seq = (prompt + tokens + [self.tok.eot])[: self.length + 1]
        return seq, len(prompt)

    def pad(self, encoded: Sequence[tuple[list[int], int]], length: Optional[int] = None):
        """(decoder_input_ids, labels, loss_mask) of the sequences, padded (EOT, masked) to `length` positions."""
        length = self.length if length is None else length
        inp = np.full((len(encoded), length), self.tok.eot, np.int32)
        lab = np.full((len(encoded), length), self.tok.eot, np.int32)
        mask = np.zeros((len(encoded), length), np.float32)
        languages = set(self.tok.languages.values()) if self.tok.is_multilingual else set()
        for r, (seq, n_prompt) in enumerate(encoded):
            n = len(seq) - 1
            inp[r, :n] = seq[:-1]
            lab[r, :n] = seq[1:]
            mask[r, n_prompt - 1: n] = 1.0
            sot = seq.index(self.tok.sot)
            if sot + 1 < n_prompt and seq[sot + 1] in languages:
                mask[r, sot] = 1.0            # SOT -> the language token: language detection is trained
        return inp, lab, mask

    def __call__(self, tokens: list[int], language: Optional[str], rng: np.random.Generator,
                 plain: Optional[list[int]] = None, prev: Optional[list[int]] = None, task: Optional[str] = None):
        inp, lab, mask = self.pad([self.encode(tokens, language, rng, plain, prev, task)])
        return inp[0], lab[0], mask[0]


def label_length(sets: Sequence[LabelledSet], max_label_length: int, multiple: int = 16,
                 prev_context_probability: float = 0.0) -> int:
    """The run's longest label length (the bucket cap): the longest sequence, rounded up; with previous-text
    prompts and some row that has a previous window, max_label_length."""
    if prev_context_probability > 0 and any(p >= 0 for s in sets for p in s.prev):
        return max_label_length
    longest = max(len(t) for s in sets for t in s.tokens) + 5      # prompt (<= 4) + EOT
    return min(max_label_length, multiple * math.ceil(longest / multiple))


def bucket_length(longest: int, cap: int, bucket: int) -> int:
    """Positions a batch is padded to: its longest input (`longest` positions) rounded up to a multiple of
    `bucket`, at most `cap`; `bucket` 0 = always `cap`."""
    if bucket <= 0:
        return cap
    return min(cap, bucket * max(1, math.ceil(longest / bucket)))


def target_positions(mask: np.ndarray) -> np.ndarray:
    """(b, k) int32: each row's unmasked positions of `mask` (b, t) in order, the rest of the row filled with its
    first masked position (its mask is 0 there: repeats add nothing to the loss); k = the largest unmasked count
    rounded up to a multiple of t / 4 (t when t is not a multiple of 4), at most t. A row with fewer than k
    unmasked positions always has a masked one."""
    b, t = mask.shape
    on = mask > 0
    counts = on.sum(axis=1)
    quarter = t // 4 if t % 4 == 0 else t
    k = min(t, quarter * max(1, math.ceil(int(counts.max(initial=0)) / quarter)))
    out = np.zeros((b, k), np.int32)
    for r in range(b):
        pos = np.flatnonzero(on[r])
        out[r, :len(pos)] = pos
        if len(pos) < k:
            out[r, len(pos):] = np.flatnonzero(~on[r])[0]
    return out


class TrainBatches:
    """`batch(step)` -> this process's rows of global batch `step` as numpy arrays (audio decoded, not yet mel;
    or, with an encoder cache, the cached encoder output)."""

    def __init__(self, sets: Sequence[LabelledSet], encoder: LabelEncoder, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, workers: int = 4, label_bucket: int = 0,
                 encoder_cache=None):
        if global_batch % process_count:
            raise UserError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.sets, self.enc, self.B, self.seed = list(sets), encoder, global_batch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.bucket, self.cache = label_bucket, encoder_cache
        self.pool = futures.ThreadPoolExecutor(max(1, workers))      # decodes the rows of a batch
        self.ahead = futures.ThreadPoolExecutor(1)                     # builds the next batch meanwhile

    def rows(self, step: int) -> list[tuple[int, int]]:
        base = step * self.B + self.offset
        return [row_source(self.sets, self.seed, base + r) for r in range(self.local)]

    def _audio(self, d: int, i: int) -> tuple[np.ndarray, float]:
        """(the row's audio padded or cut to 30 s, its seconds of speech)."""
        a, speech = row_audio(self.sets[d], i)
        out = np.zeros(N_SAMPLES, np.float32)
        n = min(len(a), N_SAMPLES)
        out[:n] = a[:n]
        return out, (speech if speech is not None else n / SAMPLE_RATE)

    def labels(self, step: int, rows: Optional[list[tuple[int, int]]] = None) -> dict:
        """decoder_input_ids, labels, loss_mask (padded to the batch's bucket), n_prompt and, with length padding,
        target_positions of batch `step`."""
        rows = self.rows(step) if rows is None else rows
        encoded = []
        for r, (d, i) in enumerate(rows):
            s = self.sets[d]
            p = s.prev[i]
            encoded.append(self.enc.encode(s.tokens[i], s.language[i],
                                           np.random.default_rng([self.seed, step * self.B + self.offset + r, 2]),
                                           s.plain[i], (s.plain[p] if s.plain[p] is not None else
                                                        [t for t in s.tokens[p] if t < self.enc.tok.timestamp_begin])
                                           if p >= 0 else None, s.task[i], s.run_on[i] is not None))
        length = bucket_length(max(len(seq) - 1 for seq, _ in encoded), self.enc.length, self.bucket)
        inp, lab, mask = self.enc.pad(encoded, length)
        out = {"decoder_input_ids": inp, "labels": lab, "loss_mask": mask,
               "n_prompt": np.array([n for _, n in encoded], np.int32)}
        if self.bucket > 0:
            out["target_positions"] = target_positions(mask)
        return out

    def batch(self, step: int) -> dict:
        """This process's rows of batch `step`: audio (or encoder_out with a cache), decoder_input_ids, labels,
        loss_mask, n_prompt, ids and audio_seconds (the speech in these rows, before padding and without the gaps
        of packed windows: for speech-s/s rates)."""
        rows = self.rows(step)
        out = self.labels(step, rows)
        if self.cache is not None:
            out["encoder_out"] = self.cache.read(rows)
            seconds = [row_speech_seconds(self.sets[d], i) for d, i in rows]
        else:
            decoded = list(self.pool.map(lambda di: self._audio(*di), rows))
            out["audio"] = np.stack([a for a, _ in decoded])
            seconds = [s for _, s in decoded]
        out["ids"] = [self.sets[d].ids[i] for d, i in rows]
        out["audio_seconds"] = float(sum(seconds))
        return out

    def close(self) -> None:
        """Stop the decoding threads (a pending prefetch is abandoned)."""
        self.ahead.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def prefetch(self, start_step: int):
        """Iterator over (step, batch) from start_step, decoding the next batch while the current one trains."""
        step = start_step
        nxt = self.ahead.submit(self.batch, step)
        while True:
            cur = nxt.result()
            nxt = self.ahead.submit(self.batch, step + 1)
            yield step, cur
            step += 1


def member_window(s: LabelledSet, i: int):
    """A packed row's `dwjax.data.packing.Window` (from its `members`)."""
    mem = s.members[i]
    return Window(s.ids[i], None, tuple(Member(str(m["id"]), float(m["offset_s"]), float(m["duration_s"]))
                                        for m in mem), None)


def row_audio(s: LabelledSet, i: int) -> tuple[np.ndarray, Optional[float]]:
    """(row i's audio: its clip, or its packed window built from the members' audio at their offsets, its
    seconds of speech: None for a clip, whose length is its speech)."""
    if s.members[i] is None:
        src = s.audio[i]
        a = load_audio_bytes(src, name=s.ids[i]) if isinstance(src, bytes) else load_audio(src)
        return a, None
    held = s.member_bytes[i] or [None] * len(s.members[i])
    clips = [load_audio_bytes(b, name=f"{s.ids[i]}/{m['id']}") if b else load_audio(m["audio"])
             for m, b in zip(s.members[i], held)]
    try:
        return window_audio(member_window(s, i), clips), s.speech_s[i]
    except ValueError as e:
        raise UserError(f"{s.name}: packed row {s.ids[i]}: {e} (the audio changed since labelling?)") from None


def row_speech_seconds(s: LabelledSet, i: int) -> float:
    """Seconds of speech in row i: the members' durations, the label's duration_s (<= 30 s), or (decoding the
    clip) its length."""
    if s.speech_s[i] is None and s.durations[i] is not None:
        s.speech_s[i] = min(float(s.durations[i]), N_SAMPLES / SAMPLE_RATE)
    if s.speech_s[i] is None:
        a, _ = row_audio(s, i)
        s.speech_s[i] = min(len(a), N_SAMPLES) / SAMPLE_RATE
    return float(s.speech_s[i])
