"""Beam search: one jitted `lax.while_loop` with a KV cache, the same logit rules as greedy, per-beam history.

Semantics are transformers' (`generate(num_beams=k)`, `early_stopping=False`), so results can be compared token for
token:
  * the scores are the log-softmax of the raw logits with the rules' masked tokens removed (-inf), not renormalised
    after masking (OpenAI renormalises);
  * each step keeps the 2k best continuations over all k beams; those among the first k that end (EOT, or the
    `max_new_tokens`-th token) become finished hypotheses with score sum_logprob / length ** length_penalty, where
    length counts the generated tokens including EOT (OpenAI's ranker divides by the length without EOT);
    the k best unfinished continuations go on;
  * a row stops taking new hypotheses once its k finished slots are full and its best running beam, normalised
    by the current length, cannot beat its worst finished one (transformers' heuristic); the loop stops when no
    row can improve or `max_new_tokens` is reached.
`length_penalty=None` is the default exponent 1.0 (sum logprob / length).
The KV cache holds batch * k rows (beam-major within each batch row) and is reordered each step by gathering
along its batch axis. `Generator.beam_search` (generate.py) jits it.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dwjax.decoding.rules import DecodeSpec, apply_rules, jax_log_softmax
from dwjax.models.whisper import Whisper, init_cache

_NEG = -1.0e9


def _gather_beams(x, idx):
    """x: (b, n, ...), idx: (b, m) -> (b, m, ...)."""
    return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0))(x, idx)


def beam_search_loop(model: Whisper, spec: DecodeSpec, params, enc_out, prompt, max_new_tokens: int,
                     num_beams: int, length_penalty: Optional[float] = None, sot_index: int = 0):
    """Pure function (jit it). enc_out: (b, n_audio_ctx, d); prompt: (b, p) int32. Returns a dict like
    `decode_loop`: tokens (b, max_new) EOT-padded, lengths, sum_logprob (of the best hypothesis, EOT included),
    no_speech_prob, and score (the length-normalised score that ranked it)."""
    b, p = prompt.shape
    k = num_beams
    n_cand = 2 * k
    alpha = 1.0 if length_penalty is None else float(length_penalty)
    vocab = model.cfg.vocab_size

    # every batch row repeated k times (beam-major inside a row): flat row index = row * k + beam
    enc_k = jnp.repeat(enc_out, k, axis=0)
    prompt_k = jnp.repeat(prompt, k, axis=0)
    cache = init_cache(model.cfg, b * k, p + max_new_tokens, enc_out.dtype)
    logits, cache = model.apply({"params": params}, prompt_k, enc_k, cache, method="decode")
    no_speech = jax.nn.softmax(logits[::k, sot_index].astype(jnp.float32), axis=-1)[:, spec.no_speech]

    none = jnp.full((b, k), -1, jnp.int32)
    state = dict(
        step=jnp.int32(0),
        logits=logits[:, -1].astype(jnp.float32),                       # (b*k, v) next-token logits per beam
        cache=cache,
        seqs=jnp.full((b, k, max_new_tokens), spec.eot, jnp.int32),     # running beams
        scores=jnp.concatenate([jnp.zeros((b, 1)), jnp.full((b, k - 1), _NEG)], axis=1).astype(jnp.float32),
        last=none, penult=none, last_ts=none,
        fin_seqs=jnp.full((b, k, max_new_tokens), spec.eot, jnp.int32),  # finished hypotheses, best first
        fin_scores=jnp.full((b, k), _NEG, jnp.float32),                 # length-normalised
        fin_sum=jnp.zeros((b, k), jnp.float32),                         # raw sum of log-probabilities
        fin_len=jnp.zeros((b, k), jnp.int32),                           # tokens before EOT
        fin_done=jnp.zeros((b, k), bool),
        open=jnp.ones((b,), bool),                                      # can this row still improve?
    )

    def cond(s):
        return (s["step"] < max_new_tokens) & jnp.any(s["open"])

    def body(s):
        t = s["step"]
        flat = lambda x: x.reshape(b * k)
        lp = jax_log_softmax(s["logits"])
        lp = apply_rules(spec, lp, t, flat(s["last"]), flat(s["penult"]), flat(s["last_ts"]))
        total = lp.reshape(b, k, vocab) + s["scores"][:, :, None]
        top_lp, top_idx = jax.lax.top_k(total.reshape(b, k * vocab), n_cand)     # (b, 2k), best first
        src = top_idx // vocab
        tok = (top_idx % vocab).astype(jnp.int32)
        is_last_step = t + 1 >= max_new_tokens
        hits = (tok == spec.eot) | is_last_step                                # candidate ends here
        cand_seqs = _gather_beams(s["seqs"], src).at[:, :, t].set(tok)

        # finished hypotheses: only candidates among the first k, and only while the row can still improve
        new_fin = hits & (jnp.arange(n_cand) < k)[None, :] & s["open"][:, None]
        norm = top_lp / jnp.power(jnp.float32(t + 1), alpha)
        cand_fin_scores = jnp.where(new_fin, norm, _NEG)
        cand_len = jnp.where(tok == spec.eot, t, t + 1).astype(jnp.int32)
        m_scores = jnp.concatenate([s["fin_scores"], cand_fin_scores], axis=1)
        keep = jax.lax.top_k(m_scores, k)[1]
        fin_seqs = _gather_beams(jnp.concatenate([s["fin_seqs"], cand_seqs], axis=1), keep)
        fin_scores = _gather_beams(m_scores, keep)
        fin_sum = _gather_beams(jnp.concatenate([s["fin_sum"], top_lp], axis=1), keep)
        fin_len = _gather_beams(jnp.concatenate([s["fin_len"], cand_len], axis=1), keep)
        fin_done = _gather_beams(jnp.concatenate([s["fin_done"], new_fin], axis=1), keep)

        # running beams: the k best candidates that did not end
        run_lp = top_lp + jnp.where(hits, _NEG, 0.0)
        run_scores, pick = jax.lax.top_k(run_lp, k)
        seqs = _gather_beams(cand_seqs, pick)
        parent = _gather_beams(src, pick)                                        # (b, k) beam each came from
        new_tok = _gather_beams(tok, pick)
        last, penult, last_ts = (_gather_beams(x, parent) for x in (s["last"], s["penult"], s["last_ts"]))
        penult, last = last, new_tok
        last_ts = jnp.where(new_tok >= spec.timestamp_begin, new_tok, last_ts)

        # reorder the cache rows to follow their beams, then feed the new tokens
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(b * k)
        cache = dict(s["cache"])
        for name in ("k", "v", "cross_k", "cross_v"):
            cache[name] = [jnp.take(layer, rows, axis=0) for layer in cache[name]]
        cache["index"] = jnp.take(cache["index"], rows, axis=0)
        logits, cache = model.apply({"params": params}, new_tok.reshape(b * k, 1), None, cache, method="decode")

        # transformers' early-stop heuristic (early_stopping=False): the best running beam at the current length
        best_running = run_scores[:, 0] / jnp.power(jnp.float32(t + 1), alpha)
        worst_fin = jnp.where(fin_done, jnp.min(fin_scores, axis=1, keepdims=True), _NEG)
        still_open = s["open"] & jnp.any(best_running[:, None] > worst_fin, axis=1)
        return dict(step=t + 1, logits=logits[:, 0].astype(jnp.float32), cache=cache, seqs=seqs,
                    scores=run_scores, last=last, penult=penult, last_ts=last_ts, fin_seqs=fin_seqs,
                    fin_scores=fin_scores, fin_sum=fin_sum, fin_len=fin_len, fin_done=fin_done, open=still_open)

    state = jax.lax.while_loop(cond, body, state)
    best_seq, best_len = state["fin_seqs"][:, 0], state["fin_len"][:, 0]
    pos = jnp.arange(max_new_tokens)[None, :]
    tokens = jnp.where(pos < best_len[:, None], best_seq, spec.eot)
    return dict(tokens=tokens, lengths=best_len, sum_logprob=state["fin_sum"][:, 0], no_speech_prob=no_speech,
                score=state["fin_scores"][:, 0])
