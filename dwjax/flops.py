"""FLOP formulas (analytic, matmuls only) and device peaks: what MFU and `dwjax plan` are measured against.

One place for the arithmetic that `dwjax distill` (its logged MFU), `dwjax plan` and the benchmarks report.
"""
from __future__ import annotations

import os

import jax

from dwjax.train_step import shares_encoder

CPU_PEAK_FLOPS = 140e9     # this project's reference CPU (2 cores, fp32); set DWJAX_PEAK_FLOPS for others

#: dense peaks per device (bf16 on accelerators), matched against the lower-cased device kind
DEVICE_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v4": 275e12, "v5e": 197e12, "v5p": 459e12,
                     "v6e": 918e12}


def peak_flops(devices=None) -> float:
    """Peak FLOP/s of `devices` together (default: all): DWJAX_PEAK_FLOPS when set, else the table, else the CPU's."""
    if "DWJAX_PEAK_FLOPS" in os.environ:
        return float(os.environ["DWJAX_PEAK_FLOPS"])
    devices = list(jax.devices() if devices is None else devices)
    kind = devices[0].device_kind.lower()
    for key, value in DEVICE_PEAK_FLOPS.items():
        if key in kind:
            return value * len(devices)
    return CPU_PEAK_FLOPS


def decoder_flops_per_token(cfg, with_backward: bool, frozen_embedding: bool = False) -> float:
    """Matmul FLOPs per label token of one decoder forward (x3 with backward): self/cross attention projections,
    MLP, vocabulary projection. Attention scores and the cross keys/values of the encoder output are per
    sequence: `decoder_attention_flops`. `frozen_embedding` (optim.frozen holds embed_tokens): the vocabulary
    projection's backward has no weight gradient, so it costs 2x its forward, not 3x."""
    d, f, L = cfg.d_model, cfg.ffn_dim, cfg.decoder_layers
    per_layer = 2 * (4 * d * d + 2 * d * d + 2 * d * f)
    return (3 if with_backward else 1) * L * per_layer + vocab_flops_per_token(cfg, with_backward, frozen_embedding)


def vocab_flops_per_token(cfg, with_backward: bool, frozen_embedding: bool = False) -> float:
    """The vocabulary projection's share of `decoder_flops_per_token`."""
    passes = 1 if not with_backward else (2 if frozen_embedding else 3)
    return passes * 2 * cfg.d_model * cfg.vocab_size


def decoder_attention_flops(cfg, length: int, passes_scores: int, passes_kv: int) -> float:
    """Per sequence of `length` tokens: attention scores (self and cross, QK^T and AV) x `passes_scores`, and the
    cross keys/values of the encoder output x `passes_kv` (forward 1; with backward 3 for scores, 2 for the keys
    and values: the frozen encoder output needs no gradient)."""
    d, te = cfg.d_model, cfg.n_audio_ctx
    scores = 2 * 2 * length * length * d + 2 * 2 * length * te * d
    kv = 2 * 2 * te * d * d
    return cfg.decoder_layers * (passes_scores * scores + passes_kv * kv)


def encoder_flops(cfg) -> float:
    """Matmul FLOPs of one encoder forward over a 30 s window (convolutions, projections, MLP, attention)."""
    d, f, L, T = cfg.d_model, cfg.ffn_dim, cfg.encoder_layers, cfg.n_audio_ctx
    conv = 2 * 3 * (cfg.n_mels * d * 2 * T + d * d * T)
    return conv + L * (2 * T * (4 * d * d + 2 * d * f) + 4 * T * T * d)


def train_step_flops(teacher, student, examples: int, length: int, with_encoder: bool = True,
                     frozen: tuple[str, ...] = (), targets: int | None = None) -> tuple[float, float]:
    """(base, full) FLOPs of a distillation step over `examples` sequences of `length` label positions: base =
    per-token decoder work (student with backward, teacher forward) + the teacher encoder (`with_encoder`; False
    when its output comes from the encoder cache); full adds a student encoder of its own, attention scores and
    the cross keys/values. `frozen`: optim.frozen (a frozen embed_tokens has no weight gradient). `targets`: the
    positions the logits are computed at (the batch's target_positions width; default all `length`)."""
    frozen_embedding = "embed_tokens" in frozen
    student_per_token = decoder_flops_per_token(student, True, frozen_embedding)
    skipped = (length - (length if targets is None else targets)) * (
        vocab_flops_per_token(student, True, frozen_embedding) + vocab_flops_per_token(teacher, False))
    base = examples * (length * (student_per_token + decoder_flops_per_token(teacher, False)) - skipped
                       + (encoder_flops(teacher) if with_encoder else 0.0))
    own_encoder = 0.0 if shares_encoder(student, teacher) else examples * encoder_flops(student)
    full = base + own_encoder + examples * (decoder_attention_flops(teacher, length, 1, 1)
                                            + decoder_attention_flops(student, length, 3, 2))
    return float(base), float(full)


def generate_flops(cfg, examples: int, prompt: int, new_tokens: int) -> tuple[float, float]:
    """(base, full) FLOPs of encoding and greedily decoding `examples` windows (prompt + new_tokens tokens each);
    full adds attention over the growing cache and the cross keys/values (computed once per sequence)."""
    tokens = prompt + new_tokens
    base = examples * (encoder_flops(cfg) + tokens * decoder_flops_per_token(cfg, False))
    d, te = cfg.d_model, cfg.n_audio_ctx
    per_seq = cfg.decoder_layers * (2 * 2 * te * d * d + 2 * 2 * tokens * te * d + 2 * 2 * tokens * tokens / 2 * d)
    return float(base), float(base + examples * per_seq)
