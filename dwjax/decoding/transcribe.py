"""`Transcriber`: audio arrays in, text out. Used by `dwjax transcribe`, the pseudo-labeller and evaluation.

Short-form (<= 30 s) clips are batched into fixed-size buckets (the last batch is padded), so each
(batch size, prompt length, max_new_tokens) compiles once. Longer audio goes to the long-form decoders.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from dwjax.audio import N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from dwjax.decoding.generate import Generator
from dwjax.decoding.rules import DecodeSpec
from dwjax.errors import UserError
from dwjax.models.whisper import Whisper
from dwjax.weights.loading import LoadedModel, load_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data))) if data else 0.0


@dataclasses.dataclass
class Transcript:
    text: str
    tokens: list[int]
    language: Optional[str]
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    duration_s: float
    segments: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Transcriber:
    def __init__(self, model: str | LoadedModel, dtype: str = "float32", batch_size: int = 8,
                 scan_layers: bool = False):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        self.cfg, self.tokenizer = self.loaded.cfg, self.loaded.tokenizer
        self.module = Whisper(self.cfg, dtype=DTYPES[dtype], scan_layers=scan_layers)
        self.spec = DecodeSpec.for_model(self.tokenizer, self.loaded.generation, self.cfg.vocab_size)
        self.generator = Generator(self.module, jnp_tree(self.loaded.params), self.spec)
        self.batch_size = batch_size
        self.dtype = DTYPES[dtype]

    @property
    def n_mels(self) -> int:
        return self.cfg.n_mels

    def features(self, audios: Sequence[np.ndarray]):
        batch = np.zeros((len(audios), N_SAMPLES), np.float32)
        for i, a in enumerate(audios):
            a = a[:N_SAMPLES]
            batch[i, : len(a)] = a
        return log_mel_spectrogram(jnp.asarray(batch), n_mels=self.n_mels)

    def prompt(self, language: Optional[str], task: str, timestamps: bool) -> list[int]:
        if not self.tokenizer.is_multilingual:
            if task == "translate":
                raise UserError("an English-only model cannot translate; use a multilingual model")
            return self.tokenizer.sot_sequence(None, None, timestamps)
        return self.tokenizer.sot_sequence(language, task, timestamps)

    def _languages(self, enc_out, language: Optional[str], n: int) -> list[Optional[str]]:
        if not self.tokenizer.is_multilingual:
            return [None] * n
        if language:
            return [language] * n
        codes = list(self.tokenizer.languages)
        idx = self.generator.detect_language(enc_out, [self.tokenizer.languages[c] for c in codes])
        return [codes[i] for i in idx[:n]]

    def pad(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The clips plus silent fillers up to the batch size (one compiled bucket)."""
        n = len(audios)
        return list(audios) + [np.zeros(SAMPLE_RATE, np.float32)] * (self.batch_size - n) \
            if n < self.batch_size else list(audios)

    def transcripts(self, out, audios: Sequence[np.ndarray], langs, timestamps: bool) -> list[Transcript]:
        """`Transcript`s of the first len(audios) rows of a `GenerateOutput`."""
        results = []
        for i in range(len(audios)):
            ids = out.tokens[i, : out.lengths[i]].tolist()
            text = self.tokenizer.decode(ids).strip()
            dur = len(audios[i]) / SAMPLE_RATE
            segs = self.tokenizer.segments(ids, duration=dur) if timestamps else []
            results.append(Transcript(text=text, tokens=ids, language=langs[i],
                                      avg_logprob=float(out.avg_logprob[i]),
                                      no_speech_prob=float(out.no_speech_prob[i]),
                                      compression_ratio=compression_ratio(text), duration_s=dur, segments=segs))
        return results

    def transcribe_batch(self, audios: Sequence[np.ndarray], language: Optional[str] = None,
                         task: str = "transcribe", timestamps: bool = False, max_new_tokens: int = 224,
                         temperature: float = 0.0, seed: int = 0, num_beams: int = 1) -> list[Transcript]:
        """One padded batch of <= batch_size clips of <= 30 s each."""
        padded = self.pad(audios)
        enc = self.generator.encode(self.features(padded))
        langs = self._languages(enc, language, len(padded))
        prompts = np.array([self.prompt(lang, task, timestamps) for lang in langs], np.int32)
        if num_beams > 1:
            out = self.generator.beam_search(enc, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                             timestamps=timestamps)
        else:
            out = self.generator.generate(enc, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                          seed=seed, timestamps=timestamps)
        return self.transcripts(out, audios, langs, timestamps)

    def transcribe(self, audios: Sequence[np.ndarray], progress=None, chunk_length=None, long_form="chunked",
                   **kw) -> list[Transcript]:
        return transcribe_all(self, self.batch_size, audios, progress, chunk_length, long_form, **kw)


def transcribe_all(engine, batch_size: int, audios: Sequence[np.ndarray], progress=None, chunk_length=None,
                   long_form: str = "chunked", **kw) -> list[Transcript]:
    """Any number of clips through `engine.transcribe_batch` (a Transcriber or a SpeculativeTranscriber); clips
    over 30 s go to long-form decoding (`long_form`: "chunked" or "sequential")."""
    results: list[Optional[Transcript]] = [None] * len(audios)
    short = [i for i, a in enumerate(audios) if len(a) <= N_SAMPLES]
    for start in range(0, len(short), batch_size):
        idx = short[start: start + batch_size]
        for i, r in zip(idx, engine.transcribe_batch([audios[i] for i in idx], **kw)):
            results[i] = r
        if progress is not None:
            progress(idx)
    long_ = [i for i, a in enumerate(audios) if len(a) > N_SAMPLES]
    if long_:
        from dwjax.decoding.longform import transcribe_long
        for i in long_:
            results[i] = transcribe_long(engine, audios[i], method=long_form, chunk_length=chunk_length, **kw)
            if progress is not None:
                progress([i])
    return results


class AudioProgress:
    """A tqdm bar on stderr counting audio seconds (rate in audio-s/s) over clips of `seconds` each.

    `callback(indices)` marks clips done (the `progress` argument of `transcribe`); `finish()` completes and closes
    the bar (also for transcribers that never call back). Disabled: does nothing."""

    def __init__(self, seconds: Sequence[float], desc: str, enabled: bool = True):
        self.seconds = [float(s) for s in seconds]
        self.bar = None
        if enabled and self.seconds:
            import sys

            from tqdm import tqdm
            self.bar = tqdm(total=sum(self.seconds), desc=desc, unit=" audio-s", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} audio-s "
                                       "[{elapsed}<{remaining}, {rate_noinv_fmt}]")

    def callback(self, indices) -> None:
        if self.bar is not None:
            self.bar.update(sum(self.seconds[i] for i in indices))

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.update(max(0.0, self.bar.total - self.bar.n))
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.finish() if exc_type is None else self.close()


def jnp_tree(params):
    import jax
    return jax.tree_util.tree_map(jnp.asarray, params)
