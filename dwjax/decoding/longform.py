"""Long-form (> 30 s) transcription: chunked (transformers' pipeline) and sequential (OpenAI's algorithm).

Chunked: overlapping chunks of `chunk_length` seconds with `chunk_length / 6` of stride on each side are decoded
in batches (`Transcriber.transcribe_batch`, each chunk padded to 30 s of features) and their token sequences merged
left to right at the best-scoring overlap (`merge_sequences`). Sequential: one 30 s window at a time, advanced to
the last complete timestamp, with temperature fallback and no-speech skipping.

    from dwjax.decoding.longform import transcribe_long
    t = transcribe_long(transcriber, audio)                          # chunked; 30 s (Whisper) / 15 s (students)
    t = transcribe_long(transcriber, audio, method="sequential", condition_on_previous_text=True)
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from dwjax.audio import N_SAMPLES, SAMPLE_RATE
from dwjax.decoding.transcript import Transcript, compression_ratio
from dwjax.errors import UserError

TIME_PRECISION = 0.02                   # seconds per timestamp step
SAMPLES_PER_TIMESTAMP = int(TIME_PRECISION * SAMPLE_RATE)   # 320
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# chunking and merging (pure, property-tested)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chunk:
    start: int          # first sample of the chunk in the recording
    end: int            # one past the last sample
    stride_left: int    # samples at the left edge that overlap the previous chunk (0 for the first)
    stride_right: int   # samples at the right edge that overlap the next chunk (0 for the last)

    @property
    def time_offset(self) -> float:
        """Seconds to add to the chunk's timestamps: the chunk start minus its left stride (transformers)."""
        return (self.start - self.stride_left) / SAMPLE_RATE


def chunk_spans(n_samples: int, chunk_len: int, stride_left: int, stride_right: int) -> list[Chunk]:
    """The chunks of a recording of n_samples samples (transformers' `chunk_iter` rules)."""
    if chunk_len <= 0 or stride_left < 0 or stride_right < 0:
        raise UserError("chunk length must be positive and strides non-negative")
    step = chunk_len - stride_left - stride_right
    if step <= 0:
        raise UserError(f"chunk length {chunk_len} must exceed the strides {stride_left} + {stride_right}")
    out = []
    for start in range(0, n_samples, step):
        end = start + chunk_len
        left = 0 if start == 0 else stride_left
        last = end >= n_samples
        right = 0 if last else stride_right
        if min(end, n_samples) - start > left:
            out.append(Chunk(start, min(end, n_samples), left, right))
        if last:
            break
    return out


def best_overlap(left: Sequence[int], right: Sequence[int]) -> tuple[int, int, int, int]:
    """(left_start, left_stop, right_start, right_stop) of the best alignment of the end of `left` with the start of
    `right`: for each overlap length i, matches = equal aligned positions, score = matches / i + i / 10000; only
    alignments with more than one match qualify. With none: (len(left), len(left), 0, 0) (concatenate)."""
    a, b = np.asarray(left), np.asarray(right)
    la, lb = len(a), len(b)
    best, where = 0.0, (la, la, 0, 0)
    for i in range(1, la + lb):
        l0, l1 = max(0, la - i), min(la, la + lb - i)
        r0, r1 = max(0, i - la), min(lb, i)
        matches = int(np.sum(a[l0:l1] == b[r0:r1]))
        score = matches / i + i / 10000.0
        if matches > 1 and score > best:
            best, where = score, (l0, l1, r0, r1)
    return where


def merge_sequences(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Merge chunk token sequences left to right, cutting each pair at the middle of the matched span."""
    if not sequences:
        return []
    merged: list[int] = []
    left = list(sequences[0])
    for right in sequences[1:]:
        right = list(right)
        l0, l1, r0, r1 = best_overlap(left, right)
        merged.extend(left[: (l0 + l1) // 2])
        left = right[(r0 + r1) // 2:]
    merged.extend(left)
    return merged


def offset_timestamps(tokens: Sequence[int], timestamp_begin: int, offset_s: float) -> list[int]:
    """Shift timestamp tokens by offset_s (ids may pass the vocabulary end: absolute time = (id - tb) * 0.02)."""
    shift = int(round(offset_s / TIME_PRECISION))
    return [t + shift if t >= timestamp_begin else t for t in tokens]


def accumulate_timestamps(tokens: Sequence[int], timestamp_begin: int) -> list[int]:
    """Make timestamps non-decreasing along the merged sequence (a later chunk never goes back in time)."""
    out, floor = [], timestamp_begin
    for t in tokens:
        if t >= timestamp_begin:
            t = max(t, floor)
            floor = t
        out.append(t)
    return out


def segments_from_tokens(tokens: Sequence[int], timestamp_begin: int, eot: int, decode,
                         duration: Optional[float] = None) -> list[dict]:
    """Timestamped segments {"start", "end", "text"} of a sequence whose timestamps are absolute (may be past the
    vocabulary). Same rules as `WhisperTokenizer.segments`."""
    segs, start, last_end, run = [], None, 0.0, []
    for t in tokens:
        if t >= timestamp_begin:
            sec = round((t - timestamp_begin) * TIME_PRECISION, 2)
            if run:
                segs.append({"start": start if start is not None else last_end, "end": sec, "text": decode(run)})
                run, last_end, start = [], sec, None
            else:
                start = sec
        elif t < eot:
            run.append(t)
    if run:
        segs.append({"start": start if start is not None else last_end, "end": duration, "text": decode(run)})
    return segs


def default_chunk_length(transcriber) -> float:
    """15 s for distilled students (decoder of <= 2 layers, or metadata kind "student"), else 30 s."""
    loaded = getattr(transcriber, "loaded", None)
    meta = getattr(loaded, "metadata", None) or {}
    if meta.get("kind") == "student" or transcriber.cfg.decoder_layers <= 2:
        return 15.0
    return 30.0


# ---------------------------------------------------------------------------------------------------------------
# chunked
# ---------------------------------------------------------------------------------------------------------------


def _transcript(**kw):
    kw.setdefault("compression_ratio", compression_ratio(kw["text"]))
    return Transcript(**kw)


def transcribe_chunked(transcriber, audio: np.ndarray, chunk_length: Optional[float] = None,
                       stride_length: Optional[float] = None, timestamps: bool = False,
                       predict_timestamps: bool = True, **kw):
    """Chunked long-form transcription of one recording (see the module docstring).

    `predict_timestamps` (default True) decodes every chunk in timestamp mode even when only text is wanted: on
    full 30 s windows Whisper in <|notimestamps|> mode often stops after a sentence (tiny.en on a 200 s recording:
    WER 24.9 without, 6.3 with timestamp prediction; short-form WER of the same clips 6.7). The timestamps are
    dropped before merging unless `timestamps` is set."""
    chunk_length = float(chunk_length or default_chunk_length(transcriber))
    if not 0 < chunk_length <= 30:
        raise UserError(f"chunk length must be in (0, 30] seconds, not {chunk_length}")
    stride_length = chunk_length / 6 if stride_length is None else float(stride_length)
    chunk_len = int(round(chunk_length * SAMPLE_RATE))
    stride = int(round(stride_length * SAMPLE_RATE))
    chunks = chunk_spans(len(audio), chunk_len, stride, stride)
    tok = transcriber.tokenizer
    tb, eot = tok.timestamp_begin, tok.eot
    results = []
    bs = transcriber.batch_size
    for i in range(0, len(chunks), bs):
        group = chunks[i: i + bs]
        results += transcriber.transcribe_batch([audio[c.start: c.end] for c in group],
                                                timestamps=bool(timestamps or predict_timestamps), **kw)
    seqs = []
    for c, r in zip(chunks, results):
        ids = [t for t in r.tokens if t != eot]
        seqs.append(offset_timestamps(ids, tb, c.time_offset) if timestamps else [t for t in ids if t < eot])
    merged = merge_sequences(seqs)
    duration = len(audio) / SAMPLE_RATE
    segments = []
    if timestamps:
        merged = accumulate_timestamps(merged, tb)
        segments = segments_from_tokens(merged, tb, eot, tok.decode, duration)
    text_ids = [t for t in merged if t < eot]
    text = tok.decode(text_ids).strip()
    return _transcript(text=text, tokens=merged if timestamps else text_ids,
                       language=results[0].language if results else None,
                       avg_logprob=float(np.mean([r.avg_logprob for r in results])) if results else 0.0,
                       no_speech_prob=float(np.min([r.no_speech_prob for r in results])) if results else 1.0,
                       duration_s=duration, segments=segments)


# ---------------------------------------------------------------------------------------------------------------
# sequential (OpenAI)
# ---------------------------------------------------------------------------------------------------------------


def _generate_window(transcriber, window: np.ndarray, prompt: list[int], sot_index: int, temperature: float,
                     max_new_tokens: int, seed: int, best_of: int = 1):
    """(ids, avg_logprob, no_speech_prob) of one window. With temperature > 0, `best_of` samples are drawn (one
    batch over the same encoder output) and the one with the highest mean log-probability is kept (OpenAI)."""
    mel = transcriber.features([window])
    if temperature == 0.0 and hasattr(transcriber, "engine"):     # SpeculativeTranscriber
        out = transcriber.generate(mel, np.asarray([prompt], np.int32), max_new_tokens=max_new_tokens,
                                   timestamps=True, sot_index=sot_index)
    else:
        gen = transcriber.generator
        enc = gen.encode(mel)
        n = max(1, int(best_of)) if temperature > 0 else 1
        if n > 1:
            enc = jnp.repeat(enc, n, axis=0)
        out = gen.generate(enc, np.asarray([prompt] * n, np.int32), max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, timestamps=True, sot_index=sot_index)
    lengths = np.asarray(out.lengths)
    scores = np.asarray(out.sum_logprob) / np.maximum(lengths, 1)
    i = int(np.argmax(scores))
    return out.tokens[i, : lengths[i]].tolist(), float(out.avg_logprob[i]), float(out.no_speech_prob[i])


def transcribe_sequential(transcriber, audio: np.ndarray, language: Optional[str] = None, task: str = "transcribe",
                          temperatures: Sequence[float] = TEMPERATURES, compression_ratio_threshold: float = 2.4,
                          logprob_threshold: float = -1.0, no_speech_threshold: float = 0.6,
                          condition_on_previous_text: bool = False, max_new_tokens: int = 224, seed: int = 0,
                          timestamps: bool = True, prompt_bucket: int = 16, best_of: int = 5, **_):
    """OpenAI's sequential algorithm, `best_of` samples per fallback temperature. When every temperature fails,
    the result with the best mean log-probability is kept, preferring those under the compression threshold (as
    faster-whisper does), never simply the last, highest-temperature one. The previous-text prompt is cut to a
    multiple of `prompt_bucket` tokens (at most 223) so that the number of compiled prompt lengths stays small."""
    tok = transcriber.tokenizer
    tb, eot = tok.timestamp_begin, tok.eot
    n = len(audio)
    if language is None and tok.is_multilingual:
        enc = transcriber.generator.encode(transcriber.features([audio[:N_SAMPLES]]))
        language = transcriber._languages(enc, None, 1)[0]
    base = transcriber.prompt(language, task, True)
    seek, all_tokens, prompt_reset, segments, lps, nsp = 0, [], 0, [], [], []
    while seek < n:
        window = audio[seek: seek + N_SAMPLES]
        dur = len(window) / SAMPLE_RATE
        offset = seek / SAMPLE_RATE
        prev = all_tokens[prompt_reset:] if condition_on_previous_text else []
        keep = min(len(prev), 223) // prompt_bucket * prompt_bucket
        prompt = ([tok.sot_prev] + prev[len(prev) - keep:] if keep else []) + base
        sot_index = prompt.index(tok.sot)
        tried = []                           # (avg_logprob, below the compression threshold, result)
        for temperature in temperatures:
            ids, avg_lp, no_speech = _generate_window(transcriber, window, prompt, sot_index, float(temperature),
                                                      max_new_tokens, seed, best_of)
            cr = compression_ratio(tok.decode(ids))
            tried.append((avg_lp, cr <= compression_ratio_threshold, (ids, avg_lp, no_speech)))
            fallback = cr > compression_ratio_threshold or avg_lp < logprob_threshold
            if no_speech > no_speech_threshold and avg_lp < logprob_threshold:
                fallback = False             # silence: no point retrying
            if not fallback:
                break
        else:
            # every temperature failed: keep the most probable result, never simply the last, highest-temperature
            # sample (usually the worst: genuinely repeated speech fails the compression test at every
            # temperature). Prefer results the model is confident about (mean log-probability over the threshold:
            # the compression test then flags real repetition), else those under the compression threshold
            # (faster-whisper's rule against repetition loops), else any.
            pool = [t for t in tried if t[0] >= logprob_threshold] or [t for t in tried if t[1]] or tried
            ids, avg_lp, no_speech = max(pool, key=lambda t: t[0])[2]
        if no_speech > no_speech_threshold and avg_lp <= logprob_threshold:
            seek += len(window)              # skip a silent window
            continue
        lps.append(avg_lp)
        nsp.append(no_speech)
        is_ts = [t >= tb for t in ids]
        pairs = [i + 1 for i in range(len(ids) - 1) if is_ts[i] and is_ts[i + 1]]
        single_end = len(ids) >= 2 and is_ts[-1] and not is_ts[-2]
        new_segments = []
        if pairs:
            cuts = pairs + ([len(ids)] if single_end else [])
            last = 0
            for cut in cuts:
                part = ids[last:cut]
                text_ids = [t for t in part if t < eot]
                if text_ids and part[0] >= tb and part[-1] >= tb:
                    new_segments.append({"start": round(offset + (part[0] - tb) * TIME_PRECISION, 2),
                                         "end": round(offset + (part[-1] - tb) * TIME_PRECISION, 2),
                                         "text": tok.decode(text_ids)})
                last = cut
            if single_end:
                advance = len(window)
            else:
                advance = (ids[cuts[-1] - 1] - tb) * SAMPLES_PER_TIMESTAMP
        else:
            ts = [t for t in ids if t >= tb]
            end = dur if not ts or ts[-1] == tb else (ts[-1] - tb) * TIME_PRECISION
            text_ids = [t for t in ids if t < eot]
            if text_ids:
                new_segments.append({"start": round(offset, 2), "end": round(offset + end, 2),
                                     "text": tok.decode(text_ids)})
            advance = len(window)
        segments += new_segments
        all_tokens += [t for t in ids if t < eot] if not timestamps else ids
        if not condition_on_previous_text or temperature > 0.5:
            prompt_reset = len(all_tokens)
        seek += max(advance, SAMPLES_PER_TIMESTAMP) if advance > 0 else len(window)
    text = "".join(s["text"] for s in segments).strip()
    return _transcript(text=text, tokens=[t for t in all_tokens if t < eot], language=language,
                       avg_logprob=float(np.mean(lps)) if lps else 0.0,
                       no_speech_prob=float(np.min(nsp)) if nsp else 1.0, duration_s=n / SAMPLE_RATE,
                       segments=segments if timestamps else [])


def transcribe_long(transcriber, audio: np.ndarray, method: str = "chunked", chunk_length: Optional[float] = None,
                    **kw):
    """One recording of any length -> `Transcript`. method: "chunked" (batched, the paper's long-form setting) or
    "sequential" (OpenAI's). `kw`: the `transcribe_batch` options (language, task, timestamps, max_new_tokens, ...);
    sequential also takes temperatures, thresholds and condition_on_previous_text."""
    audio = np.asarray(audio, np.float32)
    if method == "chunked":
        for key in ("temperatures", "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold",
                    "condition_on_previous_text", "prompt_bucket", "best_of"):
            kw.pop(key, None)
        return transcribe_chunked(transcriber, audio, chunk_length=chunk_length, **kw)
    if method == "sequential":
        for key in ("num_beams", "temperature", "stride_length", "predict_timestamps"):
            kw.pop(key, None)
        return transcribe_sequential(transcriber, audio, **kw)
    raise UserError(f"unknown long-form method {method!r}; use chunked or sequential")
