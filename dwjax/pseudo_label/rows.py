"""The rows of the label store: a label or the status of a row without one (failure, no speech, runaway stop), its
WER against the reference, and the clip's audio as read for it (`_load`)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import zlib
from typing import TYPE_CHECKING, Optional

import numpy as np

from dwjax.audio import N_SAMPLES, SAMPLE_RATE, SILENCE_PEAK, is_silent, load_audio, load_audio_bytes
from dwjax.data.manifest import Example
from dwjax.errors import AudioError, UserError
from dwjax.text.languages import metric, resolve_language, score

if TYPE_CHECKING:
    from dwjax.pseudo_label.teacher import Teacher

#: the kinds of rows that get no label because something failed (the part of `status` before the first ":")
FAILURE_KINDS = ("missing audio", "empty audio", "unreadable audio", "unknown language", "unsupported language",
                 "mixed scripts", "long-form decoding failed")
#: failure kinds decided by a (dataset, language) pair: reported once per pair, not once per row
LANGUAGE_KINDS = ("unknown language", "unsupported language")
#: the kind of rows that get no label because they hold no speech (not a failure)
NO_SPEECH = "no speech"
RUNAWAY = "runaway"
#: the runaway stop (package docstring): a row may generate RUNAWAY_MARGIN + RUNAWAY_TOKENS_PER_S x its seconds
RUNAWAY_TOKENS_PER_S = 20
RUNAWAY_MARGIN = 16
#: a decoding that reached the budget with a text compressing more than this is a loop, not too much speech
RUNAWAY_COMPRESSION = 2.4
#: Whisper's no-speech rule (openai/whisper transcribe()): a window is silent when the no-speech probability is
#: above NO_SPEECH_THRESHOLD and the decoding's average log-probability is below LOGPROB_THRESHOLD
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0


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
    rates = score(_safe_language(_scored_language(language, task)), [reference], [hypothesis])
    return None if rates["n_pairs"] == 0 else float(rates["rate"])


def _scored_language(language: Optional[str], task: Optional[str]) -> Optional[str]:
    """The language a label is written in: English for a translation, else the row's language."""
    return "en" if task == "translate" else language


def _safe_language(language: Optional[str]) -> Optional[str]:
    """`language` when dwjax.text.languages knows it, else None (scored as English)."""
    try:
        return resolve_language(language) if language else None
    except UserError:
        return None


def row_metric(language: Optional[str], task: Optional[str]) -> str:
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
    """The most tokens a row of `duration_s` seconds may generate (package docstring: Runaway stop), <= budget."""
    if duration_s is None:
        return budget
    return min(budget, RUNAWAY_MARGIN + int(math.ceil(RUNAWAY_TOKENS_PER_S * duration_s)))


def looped(teacher: "Teacher", ids: list[int]) -> bool:
    """Whether a decoding's text is a loop: it compresses more than RUNAWAY_COMPRESSION (package docstring)."""
    return compression_ratio(teacher.tok.decode(ids).strip()) > RUNAWAY_COMPRESSION


def ran_away(teacher: "Teacher", ids: list[int], limit: int) -> bool:
    """Whether a decoding stopped by the runaway stop: it reached its limit below the budget, or reached the budget
    with a looping text (package docstring: Runaway stop)."""
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


def _transcript_row(e: Example, duration: float, t, timestamps: bool, task: str = "transcribe",
                    language_source: Optional[str] = None) -> dict:
    segs = t.segments if timestamps else None
    return _label_row(e, duration, t.text, t.tokens, t.language or "en", t.avg_logprob, t.no_speech_prob, segs,
                      task, None, language_source)


def _speech_seconds(row: dict) -> float:
    """The clip audio of a row: its duration, or for a packed window the sum of its members' (no gaps)."""
    if row.get("members"):
        return sum(m["duration_s"] for m in json.loads(row["members"]))
    return row.get("duration_s") or 0.0


def _report_failure(row: dict, bar=None) -> None:
    """One line on stderr naming a row that failed (above the progress bar when there is one). Rows whose
    language cannot be used are not named one by one: `teacher._check_languages` named their (dataset,
    language) once."""
    if status_kind(row["status"]) in LANGUAGE_KINDS:
        return
    line = f"dwjax pseudo-label: error: {row['dataset']}/{row['id']}: {row['status']}"
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


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
