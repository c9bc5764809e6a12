"""Which pseudo-labels a distillation run trains on: the WER filter where a row has a reference, the teacher's own
confidence where it has none.

A label (a row with status "ok") is judged by exactly one filter:

  * with a reference (the row's `wer` is not null: `dwjax pseudo-label` scores a label against a non-empty
    normalised reference) -> the WER filter: dropped when WER % > `wer_threshold`.
  * without one (`wer` null: no reference, or one that normalises to nothing) -> the confidence filter: kept only
    when avg_logprob >= `min_avg_logprob`, compression_ratio <= `max_compression_ratio` and
    no_speech_prob <= `max_no_speech_prob`. A row lacking one of these scores (a label file written without
    them) cannot be judged and is dropped as `dropped_no_scores`.

Every bound is inclusive: a value exactly at its threshold is kept (Whisper's own comparisons: transcribe() falls
back when compression_ratio > 2.4 or avg_logprob < -1.0, skips when no_speech_prob > 0.6). WER is compared as the
fraction `wer > wer_threshold / 100`, so 7 errors in 100 words pass a 7 % threshold (0.07 * 100 is 7.000000000000001).
A threshold of null (or +-inf) turns its condition off (the label passes it, and needs no score for it); with all
three confidence thresholds off labels without a reference are kept unjudged (`unfiltered`), and with the WER
threshold off so are labels with one. A per-set value in `data.train` overrides the data section's; null there
means "the data section's", so `.inf` / `-.inf` is how one set turns a condition off.

Counts (`new_counts`): each row is counted once, under the first reason that applies, in the order of REASONS;
total = kept + every dropped_* (a test checks it). `with_reference` and `without_reference` split the labels.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

#: drop reasons, in the order they are checked (a row is counted under the first that applies)
REASONS = ("dropped_status", "dropped_wer", "dropped_no_scores", "dropped_avg_logprob",
           "dropped_compression_ratio", "dropped_no_speech", "dropped_long")
FILTER_KEYS = ("wer_threshold", "min_avg_logprob", "max_compression_ratio", "max_no_speech_prob")


@dataclasses.dataclass(frozen=True)
class LabelFilter:
    """The thresholds one training set is filtered with (None = that condition off). Defaults: dwjax's (and the
    paper's) 10 % WER and Whisper's own transcribe() thresholds."""
    wer_threshold: Optional[float] = 10.0
    min_avg_logprob: Optional[float] = -1.0
    max_compression_ratio: Optional[float] = 2.4
    max_no_speech_prob: Optional[float] = 0.6

    @property
    def wer_on(self) -> bool:
        return _on(self.wer_threshold)

    @property
    def confidence_on(self) -> bool:
        return any(_on(v) for v in (self.min_avg_logprob, self.max_compression_ratio, self.max_no_speech_prob))

    @classmethod
    def for_set(cls, data, spec=None) -> "LabelFilter":
        """The filter of training set `spec` (a config DatasetSpec): its own values where set, else `data`'s
        (a config DataConfig)."""
        values = {}
        for key in FILTER_KEYS:
            own = getattr(spec, key, None) if spec is not None else None
            values[key] = own if own is not None else getattr(data, key)
        return cls(**values)


def _on(threshold: Optional[float]) -> bool:
    """A threshold that can drop something: not null and finite (config checks keep +-inf on the passing side)."""
    return threshold is not None and not math.isinf(threshold)


def new_counts() -> dict:
    """Zeroed per-set counts: total rows, labels (status ok) with/without reference, kept, unfiltered (labels no
    filter judged because theirs is off; dropped_long still applies to them), and one count per drop reason."""
    return dict(total=0, ok=0, with_reference=0, without_reference=0, kept=0, unfiltered=0,
                **{r: 0 for r in REASONS})


def _score(row: dict, key: str) -> Optional[float]:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def judge(row: dict, rule: LabelFilter, counts: Optional[dict] = None) -> Optional[str]:
    """The drop reason of `row` under `rule` (one of REASONS but dropped_long, which the loader checks), or None
    when the label is kept. With `counts`, also counts ok / with_reference / without_reference / unfiltered."""
    def bump(key):
        if counts is not None:
            counts[key] += 1

    if (row.get("status") or "ok") != "ok":           # no status (labels without the column): ok
        return "dropped_status"
    bump("ok")
    wer = _score(row, "wer")
    if wer is not None:                                     # a reference: the WER filter alone
        bump("with_reference")
        if not rule.wer_on:
            bump("unfiltered")
            return None
        return "dropped_wer" if wer > rule.wer_threshold / 100.0 else None
    bump("without_reference")                               # no reference: the teacher's confidence
    if not rule.confidence_on:
        bump("unfiltered")
        return None
    checks = (("min_avg_logprob", "avg_logprob", "dropped_avg_logprob", lambda v, t: v < t),
              ("max_compression_ratio", "compression_ratio", "dropped_compression_ratio", lambda v, t: v > t),
              ("max_no_speech_prob", "no_speech_prob", "dropped_no_speech", lambda v, t: v > t))
    active = [(getattr(rule, key), col, reason, fails) for key, col, reason, fails in checks
              if _on(getattr(rule, key))]
    if any(_score(row, col) is None for _, col, _, _ in active):
        return "dropped_no_scores"
    for threshold, col, reason, fails in active:
        if fails(_score(row, col), threshold):
            return reason
    return None


def _num(x: float) -> str:
    return f"{x:g}"


def format_counts(name: str, c: dict, rule: LabelFilter) -> str:
    """One line for the distillation banner, e.g.
    `data demo: 80/175 kept; 120 with reference: 40 WER > 10%; 55 without: 3 avg_logprob < -1, ...; 0 too long,
    0 not labelled`."""
    parts = [f"data {name}: {c['kept']}/{c['total']} kept"]
    if c["with_reference"]:
        why = ("WER filter off" if not rule.wer_on
               else f"{c['dropped_wer']} WER > {_num(rule.wer_threshold)}%")
        parts.append(f"{c['with_reference']} with reference: {why}")
    if c["without_reference"]:
        if not rule.confidence_on:
            why = "confidence filter off"
        else:
            bits = [f"{c[r]} {col} {op} {_num(t)}" for t, col, op, r in (
                (rule.min_avg_logprob, "avg_logprob", "<", "dropped_avg_logprob"),
                (rule.max_compression_ratio, "compression_ratio", ">", "dropped_compression_ratio"),
                (rule.max_no_speech_prob, "no_speech_prob", ">", "dropped_no_speech")) if _on(t)]
            if c["dropped_no_scores"]:
                bits.append(f"{c['dropped_no_scores']} without scores")
            why = ", ".join(bits)
        parts.append(f"{c['without_reference']} without reference: {why}")
    parts.append(f"{c['dropped_long']} too long, {c['dropped_status']} not labelled")
    return "; ".join(parts)
