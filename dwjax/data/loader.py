"""Training batches for distillation: pseudo-labelled audio -> (features, decoder inputs, labels, loss mask).

Order. The stream is a pure function of (seed, step): global row g = step * global_batch + r picks a dataset by
its weight (a generator seeded with (seed, g)), then the element at position g mod N_d of that dataset's
permutation for epoch g // N_d. With one dataset this is an exact epoch-by-epoch shuffle. Nothing is carried
between steps, so resuming at step s (on any number of processes) continues the same global stream.

Sharing. Process p of P builds rows [p * B/P, (p+1) * B/P) of every global batch of B rows.

Labels. A sequence is prompt + teacher tokens + EOT, where the prompt is SOT [lang task] [<|notimestamps|>].
decoder_input_ids = seq[:-1], labels = seq[1:], loss_mask = 1 where the label is a teacher token or EOT (the
forced prompt tokens and the padding are masked). Labels with timestamps keep them with probability
`timestamp_probability` (otherwise they are stripped and <|notimestamps|> is forced).

Filtering. `read_labelled` keeps the labels `dwjax/data/label_filter.py` passes (WER with a reference, the teacher's
confidence without) and no longer than max_label_length.
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import functools
import math
from typing import Optional, Sequence

import numpy as np

from dwjax.audio import N_SAMPLES, SAMPLE_RATE, load_audio, load_audio_bytes
from dwjax.data.label_filter import LabelFilter, format_counts, judge, new_counts
from dwjax.errors import UserError


@dataclasses.dataclass
class LabelledSet:
    name: str
    ids: list[str]
    audio: list            # path (str) or bytes per row
    tokens: list[list[int]]
    language: list[Optional[str]]
    weight: float = 1.0

    def __len__(self):
        return len(self.ids)


def read_labelled(name: str, path: str, rule: LabelFilter | float | None = LabelFilter(), weight: float = 1.0,
                  max_label_length: int = 448) -> tuple[LabelledSet, dict]:
    """Reads a pseudo-label directory (or parquet file) and filters its labels (`dwjax/data/label_filter.py`: the
    WER filter on rows with a reference, the teacher's confidence on rows without). `rule` is a LabelFilter, or
    a WER threshold in % (None = off) with the default confidence filter. Returns the set and the counts of
    `label_filter.new_counts` (kept, and dropped by reason) for the report."""
    if not isinstance(rule, LabelFilter):
        rule = LabelFilter(wer_threshold=rule)
    files = _label_files(path)
    table = [row for f in files for row in _read_part(f)]
    table.sort(key=lambda r: str(r["id"]))
    counts = new_counts()
    counts["total"] = len(table)
    ids, audio, tokens, langs = [], [], [], []
    for row in table:
        reason = judge(row, rule, counts)
        if reason is None:
            toks = list(row["token_ids"])
            if len(toks) + 5 > max_label_length:
                reason = "dropped_long"
        if reason is not None:
            counts[reason] += 1
            continue
        ids.append(str(row["id"]))
        audio.append(row.get("audio_bytes") or row["audio"])
        tokens.append(toks)
        langs.append(row.get("language"))
    counts["kept"] = len(ids)
    if not ids:
        raise UserError(f"{path}: no training examples left after the label filters "
                        f"({format_counts(name, counts, rule)})")
    return LabelledSet(name, ids, audio, tokens, langs, weight), counts


#: columns `read_labelled` needs (dwjax/pseudo_label.py writes these and more)
REQUIRED_COLUMNS = ("id", "audio", "token_ids")
_MANIFEST_SUFFIXES = (".jsonl", ".json", ".tsv", ".csv", ".txt")


def _pseudo_label_hint(path: str) -> str:
    return (f"data.train needs the output directory of `dwjax pseudo-label` (parquet label files), not a manifest: "
            f"run `dwjax pseudo-label --teacher TEACHER --data {path} --output LABELS` and pass path: LABELS")


def _label_files(path: str) -> list[str]:
    """The parquet files of a pseudo-label directory (or the one file given); UserError for anything else."""
    import glob
    import os
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
    """One parquet label file as rows; a missing, truncated or foreign file is a UserError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError, ValueError) as e:
        detail = " ".join(str(e).split())
        raise UserError(f"pseudo-label file {file} cannot be read (corrupt or truncated? {detail[:200]}): "
                        f"remove it and rerun `dwjax pseudo-label` on the same output to relabel its rows") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"{file} is not a pseudo-label file (no column {', '.join(missing)}): "
                        f"{_pseudo_label_hint(file)}")
    return table.to_pylist()


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


class LabelEncoder:
    """Builds padded (decoder_input_ids, labels, loss_mask) from teacher token ids."""

    def __init__(self, tokenizer, length: int, timestamp_probability: float, task: str = "transcribe"):
        self.tok, self.length, self.p_ts, self.task = tokenizer, length, timestamp_probability, task

    def __call__(self, tokens: list[int], language: Optional[str], rng: np.random.Generator):
        tb = self.tok.timestamp_begin
        has_ts = any(t >= tb for t in tokens)
        use_ts = has_ts and rng.random() < self.p_ts
        if not use_ts:
            tokens = [t for t in tokens if t < tb]
        lang = (language or "en") if self.tok.is_multilingual else None
        prompt = self.tok.sot_sequence(lang, self.task if self.tok.is_multilingual else None, use_ts)
        seq = prompt + tokens + [self.tok.eot]
        seq = seq[: self.length + 1]
        inp, lab = seq[:-1], seq[1:]
        mask = [0] * (len(prompt) - 1) + [1] * (len(lab) - len(prompt) + 1)
        pad = self.length - len(inp)
        return (np.array(inp + [self.tok.eot] * pad, np.int32), np.array(lab + [self.tok.eot] * pad, np.int32),
                np.array(mask + [0] * pad, np.float32))


def label_length(sets: Sequence[LabelledSet], max_label_length: int, multiple: int = 16) -> int:
    """One static label length for the whole run (one compile): the longest sequence, rounded up."""
    longest = max(len(t) for s in sets for t in s.tokens) + 5      # prompt (<= 4) + EOT
    return min(max_label_length, multiple * math.ceil(longest / multiple))


class TrainBatches:
    """`batch(step)` -> this process's rows of global batch `step` as numpy arrays (audio decoded, not yet mel)."""

    def __init__(self, sets: Sequence[LabelledSet], encoder: LabelEncoder, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, workers: int = 4):
        if global_batch % process_count:
            raise UserError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.sets, self.enc, self.B, self.seed = list(sets), encoder, global_batch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.pool = futures.ThreadPoolExecutor(max(1, workers))      # decodes the rows of a batch
        self.ahead = futures.ThreadPoolExecutor(1)                     # builds the next batch meanwhile

    def rows(self, step: int) -> list[tuple[int, int]]:
        base = step * self.B + self.offset
        return [row_source(self.sets, self.seed, base + r) for r in range(self.local)]

    def _audio(self, d: int, i: int) -> tuple[np.ndarray, int]:
        """(the row's audio padded or cut to 30 s, the number of real samples in it)."""
        src = self.sets[d].audio[i]
        a = load_audio_bytes(src, name=self.sets[d].ids[i]) if isinstance(src, bytes) else load_audio(src)
        out = np.zeros(N_SAMPLES, np.float32)
        n = min(len(a), N_SAMPLES)
        out[:n] = a[:n]
        return out, n

    def batch(self, step: int) -> dict:
        """This process's rows of batch `step`: audio, decoder_input_ids, labels, loss_mask, ids and
        audio_seconds (the real audio in these rows, before padding: for audio-s/s rates)."""
        rows = self.rows(step)
        decoded = list(self.pool.map(lambda di: self._audio(*di), rows))
        audio = [a for a, _ in decoded]
        enc = [self.enc(self.sets[d].tokens[i], self.sets[d].language[i],
                        np.random.default_rng([self.seed, step * self.B + self.offset + r, 2]))
               for r, (d, i) in enumerate(rows)]
        return {"audio": np.stack(audio),
                "decoder_input_ids": np.stack([e[0] for e in enc]),
                "labels": np.stack([e[1] for e in enc]),
                "loss_mask": np.stack([e[2] for e in enc]),
                "ids": [self.sets[d].ids[i] for d, i in rows],
                "audio_seconds": float(sum(n for _, n in decoded)) / SAMPLE_RATE}

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
