"""The jitted generate loop: prefill the prompt, then one token per step with a KV cache, static shapes.

`Generator` compiles one function per (batch, prompt length, max_new_tokens, temperature>0) bucket and reuses it;
`Generator.compilations` counts traces (the tests check that repeated calls with a bucket compile once).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dwjax.decoding.rules import DecodeSpec, apply_rules, jax_log_softmax
from dwjax.models.whisper import Whisper, encode_batch, init_cache, unstack_decoder


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray          # (b, max_new) generated ids, EOT-padded after the end
    lengths: np.ndarray         # (b,) tokens before EOT (EOT excluded)
    sum_logprob: np.ndarray     # (b,) log-probabilities of the chosen tokens, EOT included (OpenAI's convention)
    no_speech_prob: np.ndarray  # (b,) P(<|nospeech|>) at the SOT position

    @property
    def avg_logprob(self) -> np.ndarray:
        return self.sum_logprob / (self.lengths + 1)

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def _argmax(x):
    """jnp.argmax over the last axis (the first index of the maximum) as two plain reductions: XLA CPU runs
    argmax's (value, index) reduce unvectorised, ~10 ms per step over a batch of 8 vocabularies."""
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1).astype(jnp.int32)          # (a NaN row: the last id)


def _select(logits, temperature, rng, step):
    if temperature == 0.0:
        return _argmax(logits)
    key = jax.random.fold_in(rng, step)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


FIRST_CACHE_BUCKET = 64


def cache_buckets(prompt_len: int, max_new_tokens: int, first: int = FIRST_CACHE_BUCKET) -> tuple[int, ...]:
    """The self-attention cache lengths a decode loop grows through: first, 2 * first, ... (those above the
    prompt), then prompt_len + max_new_tokens. first <= 0: one cache of the full length."""
    total = prompt_len + max_new_tokens
    sizes, n = [], first
    while 0 < n < total:
        if n > prompt_len:
            sizes.append(n)
        n *= 2
    return tuple(sizes) + (total,)


def _grow(cache: dict, size: int) -> dict:
    """The cache with its self-attention arrays zero-padded to `size` positions (the pad is never attended)."""
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, size - a.shape[2]), (0, 0)))
    return dict(cache, k=[pad(a) for a in cache["k"]], v=[pad(a) for a in cache["v"]])


def decode_loop(model: Whisper, spec: DecodeSpec, params, enc_out, prompt, max_new_tokens: int,
                temperature: float = 0.0, rng=None, sot_index: int = 0, first_bucket: int = FIRST_CACHE_BUCKET,
                active=None, limit=None):
    """Pure function (jit it): greedy (temperature 0) or sampling. prompt: (b, p) int32, the same layout per row.

    The self-attention cache starts at `first_bucket` positions and doubles (`cache_buckets`): one while loop
    per length, each left when every row is done or its cache is full, so a step attends over (and reads) a
    cache about as long as the text so far, not the full 448 positions; first_bucket <= 0: one full cache.
    `active` (b,) bool: rows where it is False (a batch's padding) count as done from the start (EOT only), so
    they never keep the loop going. `limit` (b,) int: a row is done once it has generated that many tokens (its
    remaining positions EOT; it ends without an EOT of its own, like a row that reaches max_new_tokens): the
    pseudo-labeller's runaway stop (dwjax/pseudo_label/rows.py, runaway_limit); rows that end earlier are unchanged."""
    b, p = prompt.shape
    rng = jax.random.PRNGKey(0) if rng is None else rng
    params = unstack_decoder(params)          # per-layer weights sliced once, outside the loop
    sizes = cache_buckets(p, max_new_tokens, first_bucket)
    cache = init_cache(model.cfg, b, sizes[0], enc_out.dtype)
    logits, cache = model.apply({"params": params}, prompt, enc_out, cache, method="decode")
    no_speech = jax.nn.softmax(logits[:, sot_index].astype(jnp.float32), axis=-1)[:, spec.no_speech]
    none = jnp.full((b,), -1, jnp.int32)

    def choose(logits, step, last, penult, last_ts, done):
        masked = apply_rules(spec, logits, step, last, penult, last_ts)
        tok = _select(masked, temperature, rng, step)
        lp = jnp.take_along_axis(jax_log_softmax(masked), tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, spec.eot, tok)
        lp = jnp.where(done, 0.0, lp)
        return tok, lp

    done0 = jnp.zeros((b,), bool) if active is None else ~jnp.asarray(active, bool)
    tok, lp = choose(logits[:, -1], 0, none, none, none, done0)
    tokens = jnp.full((b, max_new_tokens), spec.eot, jnp.int32).at[:, 0].set(tok)
    limit = jnp.full((b,), max_new_tokens + 1, jnp.int32) if limit is None else jnp.asarray(limit, jnp.int32)
    state = dict(step=jnp.int32(1), tokens=tokens, cache=cache, last=tok, penult=none,
                 last_ts=jnp.where(tok >= spec.timestamp_begin, tok, -1), done=(tok == spec.eot) | (limit <= 1),
                 sum_lp=lp)

    def cond(s):
        # step s feeds the previous token at cache position p + s - 1
        return (s["step"] < min(max_new_tokens, s["cache"]["k"][0].shape[2] - p + 1)) & ~jnp.all(s["done"])

    def body(s):
        logits, cache = model.apply({"params": params}, s["last"][:, None], None, s["cache"], method="decode")
        tok, lp = choose(logits[:, 0], s["step"], s["last"], s["penult"], s["last_ts"], s["done"])
        return dict(step=s["step"] + 1, tokens=s["tokens"].at[:, s["step"]].set(tok), cache=cache, last=tok,
                    penult=s["last"], last_ts=jnp.where(tok >= spec.timestamp_begin, tok, s["last_ts"]),
                    done=s["done"] | (tok == spec.eot) | (s["step"] + 1 >= limit), sum_lp=s["sum_lp"] + lp)

    for i, size in enumerate(sizes):
        if i:
            state = dict(state, cache=_grow(state["cache"], size))
        state = jax.lax.while_loop(cond, body, state)
    tokens = state["tokens"]
    lengths = jnp.argmax(jnp.concatenate([tokens, jnp.full((b, 1), spec.eot, jnp.int32)], 1) == spec.eot, axis=1)
    return dict(tokens=tokens, lengths=lengths, sum_logprob=state["sum_lp"], no_speech_prob=no_speech)


class Generator:
    """Holds a model, its parameters and decoding facts; compiles per bucket; returns numpy results."""

    def __init__(self, model: Whisper, params, spec: DecodeSpec):
        self.model, self.params, self.spec = model, params, spec
        self.compilations = 0
        self._encode = jax.jit(self._encode_impl)
        self._generate = jax.jit(self._generate_impl, static_argnames=("spec", "max_new_tokens", "temperature",
                                                                       "sot_index"))
        self._detect = jax.jit(self._detect_impl, static_argnames=("sot",))
        self._beam = jax.jit(self._beam_impl, static_argnames=("spec", "max_new_tokens", "num_beams",
                                                               "length_penalty", "sot_index"))

    def _encode_impl(self, params, mel):
        self.compilations += 1
        return encode_batch(self.model, params, mel)

    def _generate_impl(self, params, enc_out, prompt, rng, *, spec, max_new_tokens, temperature, sot_index):
        self.compilations += 1
        return decode_loop(self.model, spec, params, enc_out, prompt, max_new_tokens, temperature, rng, sot_index)

    def _beam_impl(self, params, enc_out, prompt, *, spec, max_new_tokens, num_beams, length_penalty, sot_index):
        from dwjax.decoding.beam import beam_search_loop
        self.compilations += 1
        return beam_search_loop(self.model, spec, params, enc_out, prompt, max_new_tokens, num_beams,
                                length_penalty, sot_index)

    def _detect_impl(self, params, enc_out, lang_ids, *, sot):
        b = enc_out.shape[0]
        logits, _ = self.model.apply({"params": params}, jnp.full((b, 1), sot, jnp.int32), enc_out, None,
                                     method="decode")
        return jnp.take(logits[:, 0], lang_ids, axis=-1)

    def encode(self, mel):
        return self._encode(self.params, jnp.asarray(mel))

    def detect_language(self, enc_out, lang_ids: list[int]) -> np.ndarray:
        """Index into lang_ids of the most probable language per row (argmax after SOT)."""
        scores = self._detect(self.params, enc_out, jnp.asarray(lang_ids, jnp.int32), sot=self.spec.sot)
        return np.asarray(jnp.argmax(scores, axis=-1))

    def _prepare(self, enc_out, prompt, max_new_tokens, timestamps, sot_index):
        prompt = np.asarray(prompt, np.int32)
        if prompt.ndim == 1:
            prompt = np.broadcast_to(prompt, (enc_out.shape[0], prompt.shape[0]))
        spec = self.spec if timestamps is None else dataclasses.replace(self.spec, timestamps=bool(timestamps))
        max_new_tokens = min(max_new_tokens, self.model.cfg.n_text_ctx - prompt.shape[1])
        if sot_index is None:
            sot_index = int(np.argmax(prompt[0] == spec.sot))
        return jnp.asarray(prompt), spec, max_new_tokens, sot_index

    @staticmethod
    def _output(out) -> GenerateOutput:
        out = jax.device_get(out)
        return GenerateOutput(tokens=out["tokens"], lengths=out["lengths"], sum_logprob=out["sum_logprob"],
                              no_speech_prob=out["no_speech_prob"])

    def generate(self, enc_out, prompt, max_new_tokens: int = 224, temperature: float = 0.0, seed: int = 0,
                 timestamps: Optional[bool] = None, sot_index: Optional[int] = None) -> GenerateOutput:
        """Greedy (temperature 0) or sampled decoding of a batch of encoder outputs."""
        prompt, spec, max_new_tokens, sot_index = self._prepare(enc_out, prompt, max_new_tokens, timestamps,
                                                                sot_index)
        return self._output(self._generate(self.params, enc_out, prompt, jax.random.PRNGKey(seed), spec=spec,
                                           max_new_tokens=max_new_tokens, temperature=float(temperature),
                                           sot_index=sot_index))

    def beam_search(self, enc_out, prompt, max_new_tokens: int = 224, num_beams: int = 5,
                    length_penalty: Optional[float] = None, timestamps: Optional[bool] = None,
                    sot_index: Optional[int] = None) -> GenerateOutput:
        """The best of `num_beams` beams per row (transformers' beam semantics, see beam.py)."""
        prompt, spec, max_new_tokens, sot_index = self._prepare(enc_out, prompt, max_new_tokens, timestamps,
                                                                sot_index)
        return self._output(self._beam(self.params, enc_out, prompt, spec=spec, max_new_tokens=max_new_tokens,
                                       num_beams=int(num_beams), length_penalty=length_penalty,
                                       sot_index=sot_index))
