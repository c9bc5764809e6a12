"""Whisper's logit rules, vectorised over the batch and jittable.

The order follows OpenAI / transformers: begin-suppression (first free position only), the suppress list, then
the timestamp rules; the "timestamps outweigh text" check reads the log-probabilities after all masks.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Static decoding facts of a model (hashable: it keys compiled functions)."""
    eot: int
    sot: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int
    vocab_size: int
    suppress: tuple = ()               # suppressed at every step
    begin_suppress: tuple = ()         # suppressed at the first free position only (blank and EOT)
    timestamps: bool = False
    max_initial_timestamp_index: int | None = 50   # first timestamp at most 1.0 s

    @classmethod
    def for_model(cls, tokenizer, generation: dict, vocab_size: int, timestamps: bool = False,
                  max_initial_timestamp_index: int | None = 50) -> "DecodeSpec":
        suppress = generation.get("suppress_ids")
        if not suppress:   # no generation config shipped: OpenAI's rule (symbols + special tokens)
            suppress = list(tokenizer.non_speech_tokens()) + [tokenizer.transcribe, tokenizer.translate,
                                                              tokenizer.sot, tokenizer.sot_prev, tokenizer.sot_lm,
                                                              tokenizer.no_speech]
        begin = generation.get("suppress_ids_begin") or [tokenizer.encode(" ")[0], tokenizer.eot]
        return cls(eot=tokenizer.eot, sot=tokenizer.sot, no_speech=tokenizer.no_speech,
                   no_timestamps=tokenizer.no_timestamps, timestamp_begin=tokenizer.timestamp_begin,
                   vocab_size=vocab_size, suppress=tuple(sorted({int(t) for t in suppress if t < vocab_size})),
                   begin_suppress=tuple(sorted({int(t) for t in begin})), timestamps=timestamps,
                   max_initial_timestamp_index=max_initial_timestamp_index)


def _mask_ids(logits, ids):
    if not ids:
        return logits
    return logits.at[..., jnp.asarray(ids)].set(NEG_INF)


def apply_rules(spec: DecodeSpec, logits, step, last, penultimate, last_timestamp):
    """logits: (b, v) float32 for the next token; step: scalar int, 0 at the first free position;
    last, penultimate: (b,) the previous two generated tokens (-1 where none);
    last_timestamp: (b,) the last generated timestamp token (-1 where none). Returns masked logits."""
    logits = jnp.where(step == 0, _mask_ids(logits, spec.begin_suppress), logits)
    logits = _mask_ids(logits, spec.suppress)
    if not spec.timestamps:
        return logits
    tb, vocab = spec.timestamp_begin, jnp.arange(logits.shape[-1])[None, :]
    is_ts = vocab >= tb
    logits = logits.at[:, spec.no_timestamps].set(NEG_INF)

    last_ts = (last >= tb)[:, None]
    penult_ts = ((penultimate >= tb) | (step < 2))[:, None]          # "fewer than two" counts as a timestamp
    logits = jnp.where(last_ts & penult_ts & is_ts, NEG_INF, logits)                   # after a pair: text
    logits = jnp.where(last_ts & ~penult_ts & (vocab < spec.eot), NEG_INF, logits)     # after one: ts or EOT
    # timestamps never decrease, and a closing one is strictly larger than the opening one
    floor = jnp.where(last_ts[:, 0] & ~penult_ts[:, 0], last_timestamp, last_timestamp + 1)
    floor = jnp.where(last_timestamp >= 0, floor, tb)[:, None]
    logits = jnp.where(is_ts & (vocab < floor), NEG_INF, logits)
    # the first free position: only a timestamp, at most max_initial_timestamp
    first = step == 0
    logits = jnp.where(first & ~is_ts, NEG_INF, logits)
    if spec.max_initial_timestamp_index is not None:
        logits = jnp.where(first & (vocab > tb + spec.max_initial_timestamp_index), NEG_INF, logits)
    # if the timestamps together are more probable than any single text token, emit a timestamp
    logprobs = jax_log_softmax(logits)
    ts_lp = _logsumexp(jnp.where(is_ts, logprobs, NEG_INF))
    text_lp = jnp.max(jnp.where(is_ts, NEG_INF, logprobs), axis=-1)
    return jnp.where((ts_lp > text_lp)[:, None] & ~is_ts, NEG_INF, logits)


def jax_log_softmax(x):
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return x - m - jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True))


def _logsumexp(x):
    m = jnp.max(x, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    return jnp.log(jnp.sum(jnp.exp(x - m_safe[:, None]), axis=-1)) + m_safe
