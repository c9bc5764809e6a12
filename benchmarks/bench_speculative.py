"""Speculative decoding vs the teacher's own greedy decoding: decode and end-to-end time, acceptance, cost ratio.

    python benchmarks/bench_speculative.py                              # base + its own 2-layer slice (untrained)
    python benchmarks/bench_speculative.py --assistant runs/student --k 5 --batch 1 4

For each batch size and each input kind (short clips; 30 s windows full of speech) it prints: teacher greedy and
speculative decode times (encoder output precomputed), end-to-end times (features + encoder + decoding), the measured
speed-up, the acceptance rate α, the draft/teacher cost ratio c (one assistant decode step / one teacher decode
step, from timing each model's plain greedy loop per step) and the paper's predicted speed-up
(1 - α^(K+1)) / ((1 - α)(cK + 1)), plus that prediction for large-v2 + distil-large-v2 (32-2, c ≈ 0.15).
Timings are printed, never asserted. The untrained slice accepts few drafts, so expect a slow-down with it.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _progress import echo, progress, tick  # noqa: E402
from dwjax.audio import N_SAMPLES, SAMPLE_RATE, load_audio  # noqa: E402

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real" / "manifest.tsv"


def predicted_speedup(alpha: float, k: int, c: float) -> float:
    if alpha >= 1.0:
        return (k + 1) / (c * k + 1)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (c * k + 1))


def clips(n: int, manifest=None) -> list[np.ndarray]:
    if manifest:
        from dwjax.data.manifest import read_dataset
        rows = read_dataset(manifest)
        step = max(1, len(rows) // n)
        return [load_audio(r.audio_path) for r in rows[::step][:n]]
    if REAL.exists():
        with REAL.open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        step = max(1, len(rows) // n)
        return [load_audio(REAL.parent.parent / r["path"]) for r in rows[::step][:n]]
    from tests.helpers import synthesize
    return [a for _, a in synthesize(tempfile.mkdtemp(), n)]


def windows(pool: list[np.ndarray], n: int) -> list[np.ndarray]:
    """n 30 s windows, each full of speech (clips joined with 0.2 s pauses, cut at 30 s)."""
    pause = np.zeros(int(0.2 * SAMPLE_RATE), np.float32)
    out, i = [], 0
    for _ in range(n):
        parts, total = [], 0
        while total < N_SAMPLES:
            a = pool[i % len(pool)]
            parts += [a, pause]
            total += len(a) + len(pause)
            i += 1
        out.append(np.concatenate(parts)[:N_SAMPLES])
    return out


def n_tokens(result) -> int:
    """Tokens decoded: a GenerateOutput, or a list of Transcripts."""
    if hasattr(result, "lengths"):
        return int(np.sum(result.lengths))
    return sum(len(t.tokens) for t in result)


def timed(fn, repeats: int, done=lambda r, t: None):
    """Best of `repeats` runs after a warm-up; `done(result, seconds)` after each run, outside its timing (seconds
    None: the warm-up)."""
    done(fn(), None)   # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = fn()
        t = time.perf_counter() - t0
        best = min(best, t)
        done(r, t)
    return best, r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="builtin:whisper-base")
    p.add_argument("--manifest", default=None, help="draw the clips from this manifest (default: ../shared real speech)")
    p.add_argument("--assistant", default=None, help="a distilled student (default: the teacher's 2-layer slice)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=224)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)

    from dwjax.decoding.speculative import SpeculativeTranscriber
    from dwjax.decoding.transcribe import Transcriber
    from dwjax.models.student import make_student
    from dwjax.weights.loading import LoadedModel, load_model

    teacher = load_model(args.teacher)
    if args.assistant:
        student = load_model(args.assistant)
    else:
        s_cfg, s_params = make_student(teacher.cfg, teacher.params, decoder_layers=2)
        student = LoadedModel(s_cfg, s_params, teacher.tokenizer, teacher.generation, "2-layer slice")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); teacher {args.teacher} "
          f"({teacher.cfg.decoder_layers} dec layers), assistant {student.source} ({student.cfg.decoder_layers}); "
          f"K={args.k}, dtype {args.dtype}")
    pool = clips(16, args.manifest)
    inputs = {"short": pool, "30s": windows(pool, max(args.batch))}
    rows = []
    bar = progress(len(args.batch) * len(inputs) * 8 * (1 + args.repeats), "bench_speculative", unit="run")

    def done(label):
        return lambda r, t: tick(bar, 1, f"{label}: " +
                                 ("warm-up" if t is None else f"{n_tokens(r) / t:.1f} tokens/s"))

    for b in args.batch:
        tr = Transcriber(teacher, dtype=args.dtype, batch_size=b)
        st = Transcriber(student, dtype=args.dtype, batch_size=b)
        fast = SpeculativeTranscriber(tr, st, k=args.k)
        for kind, audios in inputs.items():
            batch = audios[:b]
            mel = tr.features(batch)
            prompt = np.asarray([tr.prompt(None if not tr.tokenizer.is_multilingual else "en", "transcribe", False)]
                                * b, np.int32)
            enc = tr.generator.encode(mel)
            s_enc = enc if fast.engine.share_encoder else st.generator.encode(mel)
            case = f"b{b} {kind}"
            t_dec, t_out = timed(lambda: tr.generator.generate(enc, prompt, args.max_new_tokens), args.repeats,
                                 done(f"{case} teacher decode"))
            s_dec, s_out = timed(lambda: st.generator.generate(s_enc, prompt, args.max_new_tokens), args.repeats,
                                 done(f"{case} assistant decode"))
            fast.reset_stats()
            sp_dec, sp_out = timed(lambda: fast.generate(None, prompt, args.max_new_tokens, encoded=(enc, s_enc)),
                                   args.repeats, done(f"{case} speculative decode"))
            assert [list(x) for x in sp_out.sequences()] == [list(x) for x in t_out.sequences()], "not exact!"
            alpha = fast.stats.acceptance_rate
            # the prefill (prompt + cross-attention keys/values over the encoder output) is a fixed cost outside
            # the per-token loop the formula models: time it alone (one new token) and take it off
            t_pre, _ = timed(lambda: tr.generator.generate(enc, prompt, 1), args.repeats,
                              done(f"{case} teacher prefill"))
            s_pre, _ = timed(lambda: st.generator.generate(s_enc, prompt, 1), args.repeats,
                              done(f"{case} assistant prefill"))
            sp_pre, _ = timed(lambda: fast.generate(None, prompt, 1, encoded=(enc, s_enc)), args.repeats,
                              done(f"{case} speculative prefill"))
            t_steps, s_steps = int(t_out.lengths.max()), int(s_out.lengths.max())
            c = ((s_dec - s_pre) / s_steps) / ((t_dec - t_pre) / t_steps)
            t_e2e, _ = timed(lambda: tr.transcribe_batch(batch), args.repeats, done(f"{case} teacher e2e"))
            sp_e2e, _ = timed(lambda: fast.transcribe_batch(batch), args.repeats, done(f"{case} speculative e2e"))
            rows.append(dict(b=b, kind=kind, tokens=float(t_out.lengths.mean()), t_dec=t_dec, sp_dec=sp_dec,
                             loop=(t_dec - t_pre) / (sp_dec - sp_pre), t_e2e=t_e2e, sp_e2e=sp_e2e, alpha=alpha,
                             c=c, pred=predicted_speedup(alpha, args.k, c)))
            r = rows[-1]
            echo(f"  batch {b} {kind}: teacher decode {t_dec:.3f}s, speculative {sp_dec:.3f}s, alpha {alpha:.3f}, "
                 f"c {c:.3f}")
    bar.close()
    print()
    print("| batch | input | tokens/row | teacher decode s | spec decode s | decode speed-up | token-loop speed-up "
          "| predicted | measured / predicted | teacher e2e s | spec e2e s | e2e speed-up | α | c |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['b']} | {r['kind']} | {r['tokens']:.0f} | {r['t_dec']:.3f} | {r['sp_dec']:.3f} | "
              f"{r['t_dec'] / r['sp_dec']:.2f}x | {r['loop']:.2f}x | {r['pred']:.2f}x | {r['loop'] / r['pred']:.2f} | "
              f"{r['t_e2e']:.3f} | {r['sp_e2e']:.3f} | {r['t_e2e'] / r['sp_e2e']:.2f}x | {r['alpha']:.3f} | "
              f"{r['c']:.3f} |")
    print("\ndecode = prefill + token loop (encoder output given); token loop = decode minus the prefill (prompt and "
          "cross-attention keys/values), the part the formula models")
    print()
    print(f"paper formula for large-v2 + distil-large-v2 (32-2, c = 0.15), K = {args.k}: " +
          ", ".join(f"α={a}: {predicted_speedup(a, args.k, 0.15):.2f}x" for a in (0.6, 0.7, 0.8, 0.9)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
