"""Decoder speed per token: teacher vs its student (2 decoder layers, or `--student-layers`), at base and at the
paper's large-v2 shape.

    python benchmarks/bench_student_speed.py [--shapes base,large-v2] [--student-layers 2] [--steps 32] [--batch 1]

Each model decodes a fixed number of greedy steps (`--steps`, EOT suppressed so every row runs them all) on a
shared random encoder output, through the same jitted loop `dwjax transcribe` uses; random weights are fine for
timing. Prints ms per token, the student/teacher speed-up, and the analytic FLOPs and weight bytes read per token
(the memory-bound ceiling on a CPU is the ratio of bytes read: vocabulary projection + layers).
The encoder is shared by teacher and student and is not part of this ratio (see bench_transcribe.py for it).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from _progress import echo, progress, tick
from dwjax.decoding.generate import Generator
from dwjax.decoding.rules import DecodeSpec
from dwjax.flops import decoder_flops_per_token
from dwjax.models.configs import official
from dwjax.models.whisper import Whisper, init_params


def per_token_bytes(cfg, batch: int = 1) -> float:
    """fp32 bytes read per decoding step: layer weights, the vocabulary projection, and the cross-attention
    keys/values over the 1500 encoder positions (per row)."""
    d, f, L, V = cfg.d_model, cfg.ffn_dim, cfg.decoder_layers, cfg.vocab_size
    return 4 * (L * (8 * d * d + 2 * d * f) + d * V + batch * L * 2 * cfg.n_audio_ctx * d)


REPEATS = 3


def time_decoder(cfg, enc, steps: int, repeats: int = REPEATS, bar=None, name: str = "") -> float:
    params = init_params(cfg, jax.random.PRNGKey(0))
    eot = 50257 if cfg.vocab_size > 51864 else 50256
    spec = DecodeSpec(eot=eot, sot=eot + 1, no_speech=eot + 105, no_timestamps=eot + 106,
                      timestamp_begin=eot + 107, vocab_size=cfg.vocab_size, suppress=(eot,))
    gen = Generator(Whisper(cfg), params, spec)
    prompt = [eot + 1]
    tokens = steps * enc.shape[0]
    gen.generate(enc, prompt, steps)                                   # compile
    if bar is not None:
        tick(bar, tokens, f"{name}: compiled")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen.generate(enc, prompt, steps)                               # returns the tokens fetched to the host
        t = time.perf_counter() - t0
        best = min(best, t)
        if bar is not None:                                            # after the timer stopped
            tick(bar, tokens, f"{name}: {tokens / t:.1f} tokens/s")
    return best / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="base,large-v2")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--student-layers", type=int, default=2, help="the student's decoder layers (default 2)")
    args = ap.parse_args()
    print("| shape | teacher ms/token | student ms/token | speed-up | MFLOP/token T / S | "
          "MB read/token T / S | bytes ceiling |")
    print("|---|---|---|---|---|---|---|", flush=True)
    shapes = args.shapes.split(",")
    bar = progress(len(shapes) * 2 * (1 + REPEATS) * args.steps * args.batch, "bench_student_speed", unit="token")
    for name in shapes:
        teacher = official(name)
        student = teacher.replace(decoder_layers=args.student_layers)
        enc = jnp.asarray(np.random.RandomState(0).randn(args.batch, teacher.n_audio_ctx, teacher.d_model)
                          .astype(np.float32) * 0.5)
        t = time_decoder(teacher, enc, args.steps, bar=bar, name=f"{name} teacher")
        s = time_decoder(student, enc, args.steps, bar=bar, name=f"{name} student")
        ft, fs = decoder_flops_per_token(teacher, False) / 1e6, decoder_flops_per_token(student, False) / 1e6
        bt, bs = per_token_bytes(teacher, args.batch) / 1e6, per_token_bytes(student, args.batch) / 1e6
        echo(f"| {name} {teacher.decoder_layers}-{teacher.decoder_layers} vs {args.student_layers} | {1e3 * t:.1f} | {1e3 * s:.1f} | "
             f"{t / s:.2f}x | {ft:.0f} / {fs:.0f} | {bt:.0f} / {bs:.0f} | {bt / bs:.2f}x |")
    bar.close()


if __name__ == "__main__":
    main()
