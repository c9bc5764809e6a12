"""`Transcriber`: audio arrays in, text out, on one device or on a mesh. Used by `dwjax transcribe`, `evaluate`,
the pseudo-labeller and in-training evaluation; its `generator` (generate.py) is the inference engine.

Short-form (<= 30 s) clips are batched into fixed-size buckets (the last batch is padded), so each
(batch size, prompt length, max_new_tokens) compiles once. Longer audio goes to the long-form decoders.

    tr = Transcriber("builtin:whisper-tiny.en")                             # one device, its own weights
    tr = Transcriber(loaded, batch_size=16, mesh=mesh, params=sharded)      # a mesh, parameters given
    tr.params = state.params                                                # new values: no recompilation
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from dwjax.audio import N_SAMPLES, SAMPLE_RATE
from dwjax.decoding.generate import Generator
from dwjax.decoding.longform import transcribe_long
from dwjax.decoding.rules import DecodeSpec
from dwjax.decoding.transcript import Transcript, compression_ratio
from dwjax.errors import ConfigError, UserError
from dwjax.mesh import replicated
from dwjax.models.kernels import Kernels
from dwjax.models.whisper import Whisper
from dwjax.weights.loading import LoadedModel, load_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}

__all__ = ["Transcriber", "Transcript", "compression_ratio", "transcribe_all", "AudioProgress", "DTYPES"]


class Transcriber:
    """A model's audio-in, `Transcript`-out API over its inference engine (`generator`).

    `model`: a name/path or a `LoadedModel` (config, tokenizer, generation config, weights). `mesh`: the engine
    splits batches over the mesh's batch axes; `batch_size` is then the global batch (a multiple of the number of
    batch devices). `params`: the parameters to decode with (default: the model's weights, on the device or
    replicated over the mesh); `params` may be assigned later (same shapes and shardings: no recompilation)."""

    def __init__(self, model: str | LoadedModel, dtype: str = "float32", batch_size: int = 8,
                 scan_layers: bool = False, mesh: Optional[Mesh] = None, params=None, kernels: Kernels = Kernels()):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        self.cfg, self.tokenizer = self.loaded.cfg, self.loaded.tokenizer
        self.module = Whisper(self.cfg, dtype=DTYPES[dtype], scan_layers=scan_layers, kernels=kernels)
        self.spec = DecodeSpec.for_model(self.tokenizer, self.loaded.generation, self.cfg.vocab_size)
        if params is None:
            params = jax.tree_util.tree_map(jnp.asarray, self.loaded.params)
            if mesh is not None:
                params = jax.device_put(params, replicated(mesh))
        self.generator = Generator(self.module, params, self.spec, mesh)
        if batch_size % self.generator.batch_devices:
            raise ConfigError(f"a batch of {batch_size} does not split over the mesh's "
                              f"{self.generator.batch_devices} batch devices")
        self.batch_size = batch_size
        self.dtype = DTYPES[dtype]

    @property
    def params(self):
        return self.generator.params

    @params.setter
    def params(self, value) -> None:
        self.generator.params = value

    @property
    def n_mels(self) -> int:
        return self.cfg.n_mels

    def features(self, audios: Sequence[np.ndarray]):
        """Log-mel features of the clips (each cut / zero-padded to 30 s), rows padded with silence to a multiple
        of the engine's batch devices."""
        d = self.generator.batch_devices
        batch = np.zeros((-(-len(audios) // d) * d, N_SAMPLES), np.float32)
        for i, a in enumerate(audios):
            a = a[:N_SAMPLES]
            batch[i, : len(a)] = a
        return self.generator.features(batch)

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

