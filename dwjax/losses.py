"""Distillation losses. Every function returns a SUM over the unmasked tokens (and `distill_loss_terms` the token
COUNT); the caller divides once, by the token count summed over all devices and microbatches (`total_loss`).

Batch layout (what the data pipeline produces and the train/eval steps consume), for T decoder positions:

    input_features     (b, n_mels, 2 * n_audio_ctx) float   log-mel features
    decoder_input_ids  (b, T) int32   tokens fed to the decoder: seq[:-1]
    labels             (b, T) int32   the next token at each position: seq[1:]
    loss_mask          (b, T) float   1 where labels[i, j] is a pseudo-label token to learn, 0 elsewhere

where `seq` is one full row `[<|startofprev|> prev...] <|startoftranscript|> [<|lang|> <|task|>]
[<|notimestamps|>] text... <|endoftext|> pad...`. The first `n_prompt` tokens of `seq` are the prompt (previous
context and every forced token): a target that is part of the prompt is masked, so the first learned target is
`seq[n_prompt]` at position `n_prompt - 1`; the <|endoftext|> target is learned; padding is masked.
`make_decoder_batch` builds the three token arrays from `seq` rows, prompt lengths and lengths.

Total loss (`total_loss`), with α_KL = loss.kl_weight, α_PL = loss.ce_weight, α_MSE = loss.mse_weight:

    (α_KL · T² · Σ KL(softmax(t/T) ‖ softmax(s/T)) + α_PL · Σ CE(s, labels) + α_MSE · Σ MSE) / n_tokens
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _mask(mask, like):
    return jnp.asarray(mask, jnp.float32).reshape(like.shape[:-1])


def kl_sum(teacher_logits, student_logits, mask, temperature: float = 1.0):
    """Σ over unmasked tokens of KL(softmax(teacher/T) ‖ softmax(student/T)), in float32 (not scaled by T²).
    Logits (..., vocab); mask (...). Gradients flow into both arguments: stop the teacher's yourself."""
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_p_t = jax.nn.log_softmax(t, axis=-1)
    log_p_s = jax.nn.log_softmax(s, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return jnp.sum(kl * _mask(mask, t))


def ce_sum(student_logits, labels, mask):
    """Σ over unmasked tokens of −log softmax(student)[label], in float32. Masked labels may hold any id."""
    s = student_logits.astype(jnp.float32)
    safe = jnp.clip(labels, 0, s.shape[-1] - 1)
    picked = jnp.take_along_axis(s, safe[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(s, axis=-1) - picked
    return jnp.sum(nll * _mask(mask, s))


def mse_sum(teacher_hidden, student_hidden, mask):
    """Σ over unmasked tokens of the mean (over the feature axis) squared difference of hidden states.
    Hidden (..., b, t, d) — extra leading axes (e.g. several mapped layers) are summed; mask (b, t)."""
    diff = teacher_hidden.astype(jnp.float32) - student_hidden.astype(jnp.float32)
    per_token = jnp.mean(jnp.square(diff), axis=-1)
    m = jnp.asarray(mask, jnp.float32)
    return jnp.sum(per_token * jnp.broadcast_to(m, per_token.shape))


def distill_loss_terms(teacher_logits, student_logits, labels, mask, temperature: float,
                       teacher_hidden=None, student_hidden=None) -> dict:
    """{"kl_sum", "ce_sum", "mse_sum", "n_tokens"}: sums over the unmasked tokens and their count (float32).
    The teacher logits are taken as constants (stop_gradient)."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    terms = {"kl_sum": kl_sum(teacher_logits, student_logits, mask, temperature),
             "ce_sum": ce_sum(student_logits, labels, mask),
             "mse_sum": jnp.zeros((), jnp.float32),
             "n_tokens": jnp.sum(jnp.asarray(mask, jnp.float32))}
    if teacher_hidden is not None and student_hidden is not None:
        terms["mse_sum"] = mse_sum(jax.lax.stop_gradient(teacher_hidden), student_hidden, mask)
    return terms


def weighted_sum(terms: dict, loss_cfg) -> jax.Array:
    """α_KL·T²·KL + α_PL·CE + α_MSE·MSE over the sums in `terms` — still a SUM, not divided by tokens."""
    t2 = loss_cfg.temperature ** 2
    total = loss_cfg.kl_weight * t2 * terms["kl_sum"] + loss_cfg.ce_weight * terms["ce_sum"]
    if loss_cfg.mse_weight:
        total = total + loss_cfg.mse_weight * terms["mse_sum"]
    return total


def total_loss(terms: dict, loss_cfg, n_tokens=None) -> jax.Array:
    """The training loss: `weighted_sum(terms)` divided once by the global token count (≥ 1)."""
    n = terms["n_tokens"] if n_tokens is None else n_tokens
    return weighted_sum(terms, loss_cfg) / jnp.maximum(n, 1.0)


def make_decoder_batch(seqs: np.ndarray, prompt_lengths, lengths) -> dict[str, np.ndarray]:
    """decoder_input_ids, labels and loss_mask (each (b, T)) from full token rows `seqs` (b, T + 1).

    `prompt_lengths[i]`: how many leading tokens of row i are prompt (previous context + forced tokens; ≥ 1,
    the start-of-transcript token); `lengths[i]`: how many tokens of row i are real (prompt + text + EOT); the
    rest is padding (any id). Host-side numpy, for the data pipeline and tests."""
    seqs = np.asarray(seqs)
    prompt_lengths = np.asarray(prompt_lengths)[:, None]
    lengths = np.asarray(lengths)[:, None]
    if np.any(prompt_lengths < 1) or np.any(lengths > seqs.shape[1]) or np.any(lengths < prompt_lengths):
        raise ValueError("need 1 <= prompt_length <= length <= row width")
    j = np.arange(seqs.shape[1] - 1)[None, :]          # position j predicts seq[j + 1]
    mask = (j + 1 >= prompt_lengths) & (j + 1 < lengths)
    return {"decoder_input_ids": seqs[:, :-1].astype(np.int32), "labels": seqs[:, 1:].astype(np.int32),
            "loss_mask": mask.astype(np.float32)}
