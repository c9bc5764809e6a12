"""The inference engine: the jitted generate loop (prefill the prompt, then one token per step with a KV cache,
static shapes) and `Generator`, every jitted step of one model on one device or on a mesh.

`Generator` compiles one function per (batch, prompt length, max_new_tokens, temperature>0) bucket and reuses it;
parameters are an argument of every compiled function, so new values of the same shapes and shardings (a training
state's at step N) reuse it. `Generator.compilations` counts traces (the tests check that repeated calls with a
bucket, or with new parameters, compile once).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dwjax.audio import log_mel_spectrogram
from dwjax.decoding.beam import beam_search_loop
from dwjax.decoding.rules import DecodeSpec, apply_rules, jax_log_softmax
from dwjax.errors import ConfigError
from dwjax.mesh import BATCH_AXES
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


def transcribe_step(model: Whisper, spec: DecodeSpec, template, language_ids, max_new: int, params, mel, lang,
                    task=None, active=None, limit=None, per_example: Optional[bool] = None):
    """One device's rows: encoder, language detection (multilingual models, rows with lang < 0), greedy decode.

    `template` is the prompt; for multilingual models (`language_ids` given) position 1 holds the language token,
    filled per row from `lang` (>= 0: forced) or the detected language, and position 2 the task token, per row
    from `task` when given. Outputs also `language` (the token used) and `language_probability` (the model's
    probability of it among the language tokens). Pure: `Generator.label` runs it (under shard_map on a mesh) for
    the pseudo-labeller; `dwjax plan` and the accelerator benchmark compile the same function. `active` (b,)
    bool: False for padding rows (not encoded, decoded as done). `limit` (b,) int: each row's most generated
    tokens (the runaway stop; default max_new). `per_example`: see `encode_batch`."""
    b = mel.shape[0]
    enc = encode_batch(model, params, mel, active, per_example)
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


class Generator:
    """The inference engine of one model: log-mel features, encoder, language detection, greedy / sampled
    decoding, beam search and the pseudo-labeller's fused step (`label`); returns numpy results.

    `params` (the current parameters, an argument of every compiled function: assign new values of the same
    shapes and shardings to reuse the compiled programs). `mesh`: batches split over its batch axes (data x
    fsdp), each device decoding its own rows under shard_map (no collective inside a decode loop, so a device
    never waits for another's longest row); the parameters may be replicated or sharded (gathered in the program).
    Batches on a mesh hold a multiple of `batch_devices` rows; with several processes every process passes the
    same global batch (host arrays) and gets every row back. `per_example_encoder`: see `encode_batch`."""

    def __init__(self, model: Whisper, params, spec: DecodeSpec, mesh: Optional[Mesh] = None,
                 per_example_encoder: Optional[bool] = None):
        self.model, self.params, self.spec, self.mesh = model, params, spec, mesh
        self.per_example_encoder = per_example_encoder
        self.batch_devices = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        self.rows = None if mesh is None else NamedSharding(mesh, P(BATCH_AXES))
        self.compilations = 0
        self._mel = None if mesh is None else jax.jit(
            lambda a: log_mel_spectrogram(a, n_mels=model.cfg.n_mels), out_shardings=self.rows)
        self._encode = self.jit(self._encode_impl, "pr")
        self._generate = self.jit(self._generate_impl, "prrp", ("spec", "max_new_tokens", "temperature",
                                                                 "sot_index"))
        self._detect = self.jit(self._detect_impl, "prp", ("sot",))
        self._beam = self.jit(self._beam_impl, "prr", ("spec", "max_new_tokens", "num_beams", "length_penalty",
                                                        "sot_index"))
        # the fused step (params, mel, lang, task, active, limit; static spec, template, language_ids, max_new):
        # `label` runs it, `dwjax plan` lowers it
        self.label_step = self.jit(self._label_impl, "prrrrr", ("spec", "template", "language_ids", "max_new"))

    def jit(self, fn, layout: str, static=()):
        """`fn` jitted; on a mesh under shard_map, layout[i] "r" for an argument split by rows, "p" for one every
        device takes whole (parameters, keys, ids)."""
        if self.mesh is None:
            return jax.jit(fn, static_argnames=static)

        @functools.wraps(fn)
        def sharded(*args, **kw):
            specs = tuple(P(BATCH_AXES) if c == "r" else P() for c in layout)
            return jax.shard_map(functools.partial(fn, **kw), mesh=self.mesh, in_specs=specs,
                                 out_specs=P(BATCH_AXES), check_vma=False)(*args)
        return jax.jit(sharded, static_argnames=static, out_shardings=self.rows)

    def _encode_impl(self, params, mel):
        self.compilations += 1
        return encode_batch(self.model, params, mel, per_example=self.per_example_encoder)

    def _generate_impl(self, params, enc_out, prompt, rng, *, spec, max_new_tokens, temperature, sot_index):
        self.compilations += 1
        if self.mesh is not None and temperature > 0:       # each device its own draws
            rng = jax.random.fold_in(rng, jax.lax.axis_index(BATCH_AXES))
        return decode_loop(self.model, spec, params, enc_out, prompt, max_new_tokens, temperature, rng, sot_index)

    def _beam_impl(self, params, enc_out, prompt, *, spec, max_new_tokens, num_beams, length_penalty, sot_index):
        self.compilations += 1
        return beam_search_loop(self.model, spec, params, enc_out, prompt, max_new_tokens, num_beams,
                                length_penalty, sot_index)

    def _detect_impl(self, params, enc_out, lang_ids, *, sot):
        b = enc_out.shape[0]
        logits, _ = self.model.apply({"params": params}, jnp.full((b, 1), sot, jnp.int32), enc_out, None,
                                     method="decode")
        return jnp.take(logits[:, 0], lang_ids, axis=-1)

    def _label_impl(self, params, mel, lang, task, active, limit, *, spec, template, language_ids, max_new):
        self.compilations += 1
        return transcribe_step(self.model, spec, template, language_ids, max_new, params, mel, lang, task, active,
                               limit, self.per_example_encoder)

    def put(self, x):
        """A host batch on the engine's devices (split by rows on a mesh); device arrays pass through."""
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        if x.shape[0] % self.batch_devices:
            raise ConfigError(f"a batch of {x.shape[0]} rows does not split over the mesh's {self.batch_devices} "
                              f"batch devices")
        return jax.make_array_from_callback(x.shape, self.rows, lambda index: x[index])

    def host(self, tree):
        """Numpy values of device results (every row, gathered from every process on a multi-process mesh)."""
        if self.mesh is None or all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(tree)):
            return jax.device_get(tree)
        return multihost_utils.process_allgather(tree, tiled=True)

    def features(self, audio):
        """Log-mel features of a (b, samples) batch of 16 kHz audio, where the batch lives."""
        if self.mesh is None:
            return log_mel_spectrogram(jnp.asarray(audio), n_mels=self.model.cfg.n_mels)
        return self._mel(self.put(audio))

    def encode(self, mel):
        return self._encode(self.params, self.put(mel))

    def detect_language(self, enc_out, lang_ids: list[int]) -> np.ndarray:
        """Index into lang_ids of the most probable language per row (argmax after SOT)."""
        scores = self._detect(self.params, enc_out, np.asarray(lang_ids, np.int32), sot=self.spec.sot)
        return np.argmax(self.host(scores), axis=-1)

    def label(self, mel, lang, task, active, limit, *, spec: DecodeSpec, template: tuple, language_ids, max_new: int):
        """`transcribe_step` on global device arrays (batch-split on a mesh); device arrays out."""
        return self.label_step(self.params, mel, lang, task, active, limit, spec=spec, template=tuple(template),
                           language_ids=None if language_ids is None else tuple(language_ids), max_new=max_new)

    def _prepare(self, enc_out, prompt, max_new_tokens, timestamps, sot_index):
        """(prompt rows as many as enc_out's, spec, max_new_tokens, sot_index, rows asked for). A 2-D prompt of
        fewer rows (a batch padded to the mesh's devices) is padded with copies of its last row."""
        prompt = np.asarray(prompt, np.int32)
        if prompt.ndim == 1:
            prompt = np.broadcast_to(prompt, (enc_out.shape[0], prompt.shape[0]))
        n = prompt.shape[0]
        if n < enc_out.shape[0]:
            prompt = np.concatenate([prompt, np.repeat(prompt[-1:], enc_out.shape[0] - n, axis=0)])
        spec = self.spec if timestamps is None else dataclasses.replace(self.spec, timestamps=bool(timestamps))
        max_new_tokens = min(max_new_tokens, self.model.cfg.n_text_ctx - prompt.shape[1])
        if sot_index is None:
            sot_index = int(np.argmax(prompt[0] == spec.sot))
        return self.put(prompt), spec, max_new_tokens, sot_index, n

    def _output(self, out, n: int) -> GenerateOutput:
        out = self.host(out)
        return GenerateOutput(tokens=out["tokens"][:n], lengths=out["lengths"][:n],
                              sum_logprob=out["sum_logprob"][:n], no_speech_prob=out["no_speech_prob"][:n])

    def generate(self, enc_out, prompt, max_new_tokens: int = 224, temperature: float = 0.0, seed: int = 0,
                 timestamps: Optional[bool] = None, sot_index: Optional[int] = None) -> GenerateOutput:
        """Greedy (temperature 0) or sampled decoding of a batch of encoder outputs."""
        prompt, spec, max_new_tokens, sot_index, n = self._prepare(enc_out, prompt, max_new_tokens, timestamps,
                                                                   sot_index)
        rng = np.asarray(jax.random.PRNGKey(seed))
        return self._output(self._generate(self.params, enc_out, prompt, rng, spec=spec,
                                           max_new_tokens=max_new_tokens, temperature=float(temperature),
                                           sot_index=sot_index), n)

    def beam_search(self, enc_out, prompt, max_new_tokens: int = 224, num_beams: int = 5,
                    length_penalty: Optional[float] = None, timestamps: Optional[bool] = None,
                    sot_index: Optional[int] = None) -> GenerateOutput:
        """The best of `num_beams` beams per row (transformers' beam semantics, see beam.py); its `sum_logprob`
        is the best hypothesis's raw log-probability sum, EOT included."""
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        prompt, spec, max_new_tokens, sot_index, n = self._prepare(enc_out, prompt, max_new_tokens, timestamps,
                                                                   sot_index)
        return self._output(self._beam(self.params, enc_out, prompt, spec=spec, max_new_tokens=max_new_tokens,
                                       num_beams=int(num_beams), length_penalty=length_penalty,
                                       sot_index=sot_index), n)
