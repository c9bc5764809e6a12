"""Accelerator numbers in one short run: the distillation step and the pseudo-labeller's step on JAX's device.

    python benchmarks/bench_accelerator.py --out accel.json                       # the default cases below
    python benchmarks/bench_accelerator.py --cases train:base:64:128,label:base:64:100 --budget-s 300
    JAX_PLATFORMS=cpu python benchmarks/bench_accelerator.py --cases train:tiny:2:16,label:tiny:2:8   # smoke test

A case is KIND:SHAPE:BATCH:LENGTH[:xla], each run in its own process so its peak device memory is its own; a
trailing `:xla` sets DWJAX_ATTENTION=einsum (einsum attention instead of cuDNN's fused kernel on GPUs) for an A/B:
  train:SHAPE:B:L   the sharded distillation step of `dwjax distill` (`make_sharded_train_step`): teacher SHAPE
                    (random weights), student = its encoder + 2 maximally spaced decoder layers, B examples per
                    device with L label positions, bf16 compute, fp32 master weights and AdamW state, layers scanned.
                    Step time is the median of --steps steps after a warm-up; MFU = analytic FLOPs (teacher
                    encoder + teacher decoder forward + student decoder forward and backward, matmuls and attention)
                    / step time / the device's dense bf16 peak (`dwjax.flops.peak_flops`).
  label:SHAPE:B:N   the pseudo-labeller's step (the inference engine's, `dwjax.decoding.generate.Generator`: log-mel of
                    30 s of audio, then `Generator.label`: encoder, greedy decode) on B windows per device, bf16,
                    random weights. Random weights rarely emit the
                    end-of-text token, so it is suppressed and every row decodes exactly N tokens: a 30 s window
                    full of speech is 80-110 tokens. Audio s/s = B x 30 s / step time; the encoder alone is timed
                    too, so the per-token decode cost is (step - encoder) / N.
Prints one table; writes all numbers (and the device's name) as JSON. Asserts nothing about timing. A progress bar
on stderr advances as each case's process ends, its rate (samples/s, audio s/s) in the postfix.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _progress import echo, progress, tick

DEFAULT_CASES = ("train:base:64:128,train:base:64:128:xla,label:base:64:100,label:base:64:100:xla,"
                 "train:large-v3:16:128,train:large-v3:16:128:xla,label:large-v3:32:100")
WINDOW_S = 30.0


def _memory() -> dict:
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30, "limit_gib": stats.get("bytes_limit", 0) / 2 ** 30}


def _timed(fn, steps: int) -> list[float]:
    import jax
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def _shape(name: str):
    from dwjax.models.configs import WhisperConfig, official
    if name == "tiny-random":   # smoke tests: a few MB
        return WhisperConfig(n_mels=80, n_audio_ctx=1500, d_model=64, encoder_heads=2, encoder_layers=2,
                             decoder_heads=2, decoder_layers=4, vocab_size=51865, n_text_ctx=448, ffn_dim=256)
    return official(name)


def run_train(shape: str, batch: int, length: int, steps: int) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train_step import analytic_flops, make_batch

    from dwjax.config import Config, override
    from dwjax.flops import peak_flops
    from dwjax.mesh import make_mesh
    from dwjax.models.student import make_student
    from dwjax.models.whisper import count_params, init_params
    from dwjax.train_step import make_sharded_train_step

    n = jax.device_count()
    cfg = override(Config(), "model.dtype=bfloat16", "model.param_dtype=float32", "model.scan_layers=true",
                   f"train.per_device_batch_size={batch}", "optim.warmup_steps=0", "optim.schedule=constant")
    t_cfg = _shape(shape)
    teacher = jax.tree_util.tree_map(np.asarray, init_params(t_cfg, jax.random.PRNGKey(0)))
    s_cfg, student = make_student(t_cfg, teacher, decoder_layers=2)
    mesh = make_mesh(cfg)
    steps_fn = make_sharded_train_step(cfg, mesh, s_cfg, t_cfg)
    state = steps_fn.init_state(student, jax.random.PRNGKey(1))
    t_params = steps_fn.shard_teacher(teacher)
    del teacher, student
    host = make_batch(t_cfg, batch * n, length)
    data = steps_fn.put_batch(host)
    t0 = time.perf_counter()
    state, m = steps_fn.train_step(state, t_params, data)           # compile + first step
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0

    def one():
        nonlocal state
        state, metrics = steps_fn.train_step(state, t_params, data)
        return metrics

    times = _timed(one, steps)
    step_s = float(np.median(times))
    flops = analytic_flops(t_cfg, s_cfg, batch * n, length)
    return {"case": f"train:{shape}", "devices": n, "global_batch": batch * n, "label_length": length,
            "teacher_params_m": count_params(t_params) / 1e6,
            "student_trainable_note": "decoder only (encoder frozen, shared)",
            "compile_and_first_step_s": first_s, "step_s": step_s, "step_s_all": times,
            "samples_per_s": batch * n / step_s, "label_tokens_per_s": float(host["loss_mask"].sum()) / step_s,
            "tflop_per_step": flops / 1e12, "tflops": flops / step_s / 1e12, "mfu": flops / step_s / peak_flops(),
            "peak_tflops": peak_flops() / 1e12, "loss": float(m["loss"]), **_memory()}


def run_label(shape: str, batch: int, new_tokens: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dwjax.audio import N_SAMPLES
    from dwjax.config import Config
    from dwjax.decoding.generate import Generator
    from dwjax.decoding.rules import DecodeSpec
    from dwjax.mesh import make_mesh, replicated
    from dwjax.models.whisper import Whisper, count_params, init_params

    n = jax.device_count()
    cfg = _shape(shape)
    model = Whisper(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, jnp.bfloat16), init_params(cfg, jax.random.PRNGKey(0)))
    # multilingual ids (<|endoftext|> 50257, <|startoftranscript|> 50258, <|en|>, <|transcribe|>,
    # <|notimestamps|>); with random weights they only shape the prompt. EOT is suppressed: exactly N tokens a row.
    eot, sot = 50257, 50258
    spec = DecodeSpec(eot=eot, sot=sot, no_speech=cfg.vocab_size - 1503, no_timestamps=cfg.vocab_size - 1502,
                      timestamp_begin=cfg.vocab_size - 1501, vocab_size=cfg.vocab_size, suppress=(eot,),
                      begin_suppress=(220, eot))
    template = (sot, 50259, cfg.vocab_size - 1506, cfg.vocab_size - 1502)
    mesh = make_mesh(Config())
    params = jax.device_put(params, replicated(mesh))
    engine = Generator(model, params, spec, mesh)
    g = batch * n
    audio = engine.put(np.random.default_rng(0).normal(0, 0.1, (g, N_SAMPLES)).astype(np.float32))
    lang, task = engine.put(np.full((g,), 50259, np.int32)), engine.put(np.full((g,), -1, np.int32))
    active, limit = engine.put(np.ones((g,), bool)), engine.put(np.full((g,), new_tokens, np.int32))

    def step():
        return engine.label(engine.features(audio), lang, task, active, limit, spec=spec, template=template,
                            language_ids=None, max_new=new_tokens)

    def encode():
        return engine.encode(engine.features(audio))

    t0 = time.perf_counter()
    out = jax.block_until_ready(step())
    first_s = time.perf_counter() - t0
    assert int(np.min(np.asarray(out["lengths"]))) == new_tokens, "a row stopped early: EOT was not suppressed"
    times = _timed(step, steps)
    jax.block_until_ready(encode())
    enc_times = _timed(encode, steps)
    step_s, enc_s = float(np.median(times)), float(np.median(enc_times))
    return {"case": f"label:{shape}", "devices": n, "global_batch": g, "new_tokens": new_tokens,
            "params_m": count_params(params) / 1e6, "compile_and_first_step_s": first_s, "step_s": step_s,
            "step_s_all": times, "encoder_s": enc_s, "decode_ms_per_token": (step_s - enc_s) / new_tokens * 1e3,
            "audio_s_per_s": g * WINDOW_S / step_s, "tokens_per_s": g * new_tokens / step_s, **_memory()}


def child(case: str, steps: int) -> None:
    import jax.numpy as jnp

    from dwjax.models.kernels import Kernels
    from dwjax.models.whisper import machine_kernels
    kind, shape, batch, length = case.split(":")[:4]
    fn = {"train": run_train, "label": run_label}[kind]
    result = fn(shape, int(batch), int(length), steps)
    result["attention"] = machine_kernels(Kernels(), jnp.bfloat16).attention
    result["case"] = case
    print("RESULT " + json.dumps(result), flush=True)


def _table(results: list[dict]) -> str:
    lines = [f"{'case':<26} {'global batch':>12} {'step s':>8} {'samples/s':>10} {'audio s/s':>10} {'tokens/s':>10} "
             f"{'MFU':>6} {'peak GiB':>9}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<26} failed: {r['error']}")
            continue
        lines.append(f"{r['case']:<26} {r['global_batch']:>12} {r['step_s']:>8.3f} "
                     f"{r['global_batch'] / r['step_s']:>10.1f} {r.get('audio_s_per_s', float('nan')):>10.0f} "
                     f"{r.get('tokens_per_s', r.get('label_tokens_per_s')):>10.0f} "
                     f"{r['mfu'] if 'mfu' in r else float('nan'):>6.1%} {r['peak_gib']:>9.2f}")
    return "\n".join(lines)


def _rate(result: dict) -> str:
    if "error" in result:
        return f"{result['case']}: {result['error'][:60]}"
    if "audio_s_per_s" in result:
        return f"{result['case']}: {result['audio_s_per_s']:.0f} audio-s/s, {result['tokens_per_s']:.0f} tokens/s"
    return f"{result['case']}: {result['samples_per_s']:.1f} samples/s, {1 / result['step_s']:.2f} steps/s"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case, after the compile + first step")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new case after this many seconds")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.steps)
    import jax
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} (JAX {jax.__version__})"
    print(f"device: {device}", flush=True)
    start, results = time.perf_counter(), []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    cases = args.cases.split(",")
    bar = progress(len(cases), "bench_accelerator", unit="case")
    for case in cases:
        if time.perf_counter() - start > args.budget_s:
            results.append({"case": case, "error": "skipped: time budget spent"})
            tick(bar, 1, _rate(results[-1]))
            continue
        t0 = time.perf_counter()
        case_env = dict(env, DWJAX_ATTENTION="einsum") if case.endswith(":xla") else env
        proc = subprocess.run([sys.executable, __file__, "--child", case, "--steps", str(args.steps)],
                              env=case_env, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append({"case": case, "error": f"exit {proc.returncode}: {tail[0][:300]}"})
            echo(proc.stderr[-3000:], file=sys.stderr)
        else:
            results.append(json.loads(found[-1][7:]))
        echo(f"{case}: {time.perf_counter() - t0:.0f} s wall; {json.dumps(results[-1])}")
        tick(bar, 1, _rate(results[-1]))
    bar.close()
    print(f"\n{device}\n{_table(results)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
