"""Distillation train-step throughput: dwjax (JAX, jitted) vs a PyTorch reference doing the same step, same run.

    python benchmarks/bench_train_step.py                      # tiny.en-shaped teacher (4-4), 4-2 student
    python benchmarks/bench_train_step.py --shape base.en --batch 8 --label-length 64 --steps 3
    JAX_PLATFORMS=cpu python benchmarks/bench_train_step.py --threads 16

One step, both sides: the frozen teacher encoder once (no grad), the teacher decoder teacher-forced (no grad), the
student decoder on the teacher's encoder output; loss (kl_weight * T^2 * KL + ce_weight * CE) / n_tokens with the
same masks; backward; clip to global norm 1; AdamW on the student decoder only. Teacher and student start from
the same random weights on both sides (dwjax -> transformers through `dwjax.weights.names`), CPU, float32.

FLOPs per step come from XLA (`jax.jit(step).lower(...).compile().cost_analysis()`, layers unrolled so no loop
body is under-counted) and, for comparison, from an analytic count (matmuls and attention only). MFU = the XLA
count / step time / --peak-gflops (140 GFLOP/s by default); on CPU the encoder runs one example at a time in a
`lax.map`, whose body XLA counts once, so there the analytic count is used. Prints a table; asserts nothing about timing.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from _progress import progress, tick
from dwjax import losses
from dwjax import train_step as ts
from dwjax.config import LossConfig, ModelConfig, OptimConfig
from dwjax.models.configs import official
from dwjax.models.student import make_student
from dwjax.models.whisper import count_params, init_params
from dwjax.weights import names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny.en", help="teacher shape from dwjax.models.configs (tiny.en, base.en, ...)")
    p.add_argument("--student-decoder-layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--label-length", type=int, default=64, help="decoder positions per example")
    p.add_argument("--steps", type=int, default=3, help="timed steps per framework (after one warm-up step)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--peak-gflops", type=float, default=140.0, help="peak FLOP/s of the machine, for MFU")
    p.add_argument("--scan-layers", action="store_true", help="time the nn.scan variant (FLOPs then analytic only)")
    p.add_argument("--skip-torch", action="store_true")
    return p.parse_args(argv)


def analytic_flops(t_cfg, s_cfg, batch: int, length: int) -> float:
    """Matmul + attention FLOPs of one step: teacher encoder and decoder forward, student decoder forward+backward."""
    d, f, S = t_cfg.d_model, t_cfg.ffn_dim, t_cfg.n_audio_ctx
    conv = 2 * 3 * t_cfg.n_mels * d * 2 * S + 2 * 3 * d * d * S
    enc_layer = 2 * S * (4 * d * d + 2 * d * f) + 4 * S * S * d
    encoder = conv + t_cfg.encoder_layers * enc_layer

    def dec_layer(t):
        self_attn = 2 * t * 4 * d * d + 4 * t * t * d
        cross = 2 * t * 2 * d * d + 2 * S * 2 * d * d + 4 * t * S * d
        return self_attn + cross + 2 * t * 2 * d * f

    def decoder(cfg, t):
        return cfg.decoder_layers * dec_layer(t) + 2 * t * d * cfg.vocab_size

    per_example = encoder + decoder(t_cfg, length) + 3 * decoder(s_cfg, length)
    return float(batch * per_example)


def make_batch(cfg, batch: int, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    seqs = rng.integers(0, cfg.vocab_size - 2000, (batch, length + 1))
    prompt = np.full(batch, 3)                                      # SOT <|en|> <|transcribe|>
    lengths = rng.integers(length // 2, length + 2, batch)
    out = losses.make_decoder_batch(seqs, prompt, lengths)
    out["input_features"] = rng.normal(size=(batch, cfg.n_mels, 2 * cfg.n_audio_ctx)).astype(np.float32)
    return out


def _done(bar, name: str, t, n: int) -> None:
    """One finished step on `bar` (after its timer stopped): t = its seconds, None for the warm-up."""
    tick(bar, 1, f"{name}: " + ("warm-up" if t is None else f"{1 / t:.2f} steps/s, {n / t:.2f} samples/s"))


def bench_jax(t_cfg, s_cfg, teacher, student, batch, args, loss_cfg, optim_cfg, bar):
    model_cfg = ModelConfig(scan_layers=args.scan_layers)
    s_model, t_model = ts.make_models(model_cfg, s_cfg, t_cfg)
    tx, schedule = ts.make_optimizer(optim_cfg)
    step = jax.jit(functools.partial(ts.train_step, student_model=s_model, teacher_model=t_model, loss_cfg=loss_cfg,
                                     tx=tx, schedule=schedule), donate_argnums=(0,))
    teacher = jax.device_put(teacher)
    batch = jax.device_put(batch)
    state = ts.init_train_state(jax.device_put(student), tx, jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    compiled = step.lower(state, teacher, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    state, m = compiled(state, teacher, batch)                      # warm-up
    jax.block_until_ready(m)
    first_loss = float(m["loss"])
    _done(bar, "jax", None, args.batch)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, teacher, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        _done(bar, "jax", times[-1], args.batch)
    return {"step_s": float(np.median(times)), "compile_s": compile_s, "xla_flops": xla_flops, "loss0": first_loss}


def bench_torch(t_cfg, s_cfg, teacher, student, batch, args, loss_cfg, optim_cfg, bar):
    import torch
    from transformers import WhisperConfig as HFConfig, WhisperForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)

    def build(cfg, params):
        hf = HFConfig(vocab_size=cfg.vocab_size, num_mel_bins=cfg.n_mels, d_model=cfg.d_model,
                      encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                      encoder_attention_heads=cfg.encoder_heads, decoder_attention_heads=cfg.decoder_heads,
                      encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, max_source_positions=cfg.n_audio_ctx,
                      max_target_positions=cfg.n_text_ctx, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        model = WhisperForConditionalGeneration(hf)
        sd = {k: torch.from_numpy(np.asarray(v)) for k, v in names.from_dwjax(params, cfg, "hf").items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if "embed_positions" not in k or "encoder" not in k]
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.float()

    teacher_m, student_m = build(t_cfg, teacher).eval(), build(s_cfg, student).train()
    for p in teacher_m.parameters():
        p.requires_grad_(False)
    for p in student_m.model.encoder.parameters():
        p.requires_grad_(False)
    trainable = [p for p in student_m.model.decoder.parameters() if p.requires_grad]   # proj_out is tied to embed
    opt = torch.optim.AdamW(trainable, lr=optim_cfg.learning_rate, betas=(optim_cfg.b1, optim_cfg.b2),
                            eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    feats = torch.from_numpy(batch["input_features"])
    dec_ids = torch.from_numpy(batch["decoder_input_ids"]).long()
    labels = torch.from_numpy(batch["labels"]).long()
    mask = torch.from_numpy(batch["loss_mask"])
    T = loss_cfg.temperature

    def step():
        with torch.no_grad():
            enc = teacher_m.model.encoder(feats).last_hidden_state
            t_logits = teacher_m(encoder_outputs=(enc,), decoder_input_ids=dec_ids).logits
        s_logits = student_m(encoder_outputs=(enc,), decoder_input_ids=dec_ids).logits
        log_pt = torch.log_softmax(t_logits / T, -1)
        kl = (log_pt.exp() * (log_pt - torch.log_softmax(s_logits / T, -1))).sum(-1)
        ce = torch.nn.functional.cross_entropy(s_logits.transpose(1, 2), labels, reduction="none")
        n = mask.sum().clamp(min=1)
        loss = (loss_cfg.kl_weight * T * T * (kl * mask).sum() + loss_cfg.ce_weight * (ce * mask).sum()) / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, optim_cfg.max_grad_norm)
        opt.step()
        return float(loss.detach())

    first_loss = step()                                                # warm-up
    _done(bar, "torch", None, args.batch)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        _done(bar, "torch", times[-1], args.batch)
    return {"step_s": float(np.median(times)), "loss0": first_loss, "threads": torch.get_num_threads()}


def main(argv=None):
    args = parse_args(argv)
    t_cfg = official(args.shape)
    optim_cfg = OptimConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant", max_grad_norm=1.0)
    loss_cfg = LossConfig(kl_weight=1.0, ce_weight=0.8, temperature=2.0)
    teacher = jax.tree_util.tree_map(np.asarray, init_params(t_cfg, jax.random.PRNGKey(0)))
    s_cfg, student = make_student(t_cfg, teacher, decoder_layers=args.student_decoder_layers)
    student = jax.tree_util.tree_map(np.array, student)
    batch = make_batch(t_cfg, args.batch, args.label_length)
    print(f"teacher {args.shape} {t_cfg.encoder_layers}-{t_cfg.decoder_layers} ({count_params(teacher) / 1e6:.1f}M), "
          f"student {s_cfg.encoder_layers}-{s_cfg.decoder_layers} ({count_params(student) / 1e6:.1f}M); batch "
          f"{args.batch} x {args.label_length} labels, {int(batch['loss_mask'].sum())} loss tokens; "
          f"JAX {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs")
    bar = progress((1 + args.steps) * (1 if args.skip_torch else 2), "bench_train_step", unit="step")
    j = bench_jax(t_cfg, s_cfg, teacher, student, batch, args, loss_cfg, optim_cfg, bar)
    flops_a = analytic_flops(t_cfg, s_cfg, args.batch, args.label_length)
    # XLA counts a loop body once: with scan, or the per-example CPU encoder (lax.map), its count is too low
    loops = args.scan_layers or jax.default_backend() == "cpu"
    flops = j["xla_flops"] if np.isfinite(j["xla_flops"]) and not loops else flops_a
    rows = [("dwjax (jax.jit)", j["step_s"], j["loss0"])]
    if not args.skip_torch:
        t = bench_torch(t_cfg, s_cfg, teacher, student, batch, args, loss_cfg, optim_cfg, bar)
        rows.append((f"PyTorch eager ({t['threads']} threads)", t["step_s"], t["loss0"]))
    bar.close()
    print(f"\nFLOPs/step: XLA cost_analysis {j['xla_flops'] / 1e9:.1f} G, analytic {flops_a / 1e9:.1f} G; "
          f"MFU uses {'XLA' if flops is j['xla_flops'] else 'analytic'}; peak {args.peak_gflops:.0f} GFLOP/s; "
          f"jax compile {j['compile_s']:.1f} s")
    print(f"{'framework':<28} {'step s':>8} {'samples/s':>10} {'GFLOP/s':>8} {'MFU':>6} {'loss@1':>8}")
    for name, step_s, loss0 in rows:
        print(f"{name:<28} {step_s:>8.3f} {args.batch / step_s:>10.2f} {flops / step_s / 1e9:>8.1f} "
              f"{flops / step_s / (args.peak_gflops * 1e9):>6.1%} {loss0:>8.4f}")
    if len(rows) == 2:
        print(f"dwjax / PyTorch throughput: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
