"""Distillation throughput in speech-seconds per second: per-clip training (today's step: every clip in its own 30 s
window, the teacher encoder run every step, labels padded to the set's longest label) against packed windows +
the on-disk encoder cache + labels padded to the batch's bucket, on the same clips, in one run.

    python benchmarks/bench_packed_train.py                               # base 6-2, 64 kathleen clips, batch 8
    python benchmarks/bench_packed_train.py --clips 96 --steps 4 --batch 8 --peak-gflops 140

Data: the first --clips clips of ../shared/data/real/manifest.tsv's kathleen set (real speech, 2-5 s), their
transcripts tokenised as the labels (a pseudo-label stand-in: the step does not care where tokens come from). Packed:
`dwjax.data.packing.pack` (one source, 0.5 s gaps, <= 30 s), each window's label the members' texts each between
timestamp tokens at its offsets, timestamp_probability 0.5 and prev_context_probability 0.5 as a v3 run would use.
Teacher: the builtin whisper-base weights (any weights time the same); student: its encoder + 2 decoder layers
(`make_student`). One device (CPU: fp32), the real loader (`TrainBatches`, audio decoding and log-mel included) and
the real sharded step (`make_sharded_train_step`).

Modes: per-clip; packed + cache + bucket with logits at every position; the same with logits only at the loss
positions (`target_positions`: what `dwjax distill` does with length padding). Both use --frozen (default: the main
job's and paper-scale run's frozen token and position embeddings; '' trains them, as the config default does).
Each mode: one warm-up step per step shape it meets is excluded (compiles), then --steps timed steps. The cache
fill (the teacher encoder once per window) is timed on its own and shown amortised over --epochs epochs.
speech-s/s counts the clips' seconds, never padding or gaps. MFU = analytic FLOPs (`dwjax.distill`'s decoder and
encoder counts, the encoder only where the step runs it) / step time / --peak-gflops. Prints a table; asserts
nothing.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", default=str(REPO.parent / "shared" / "data" / "real" / "manifest.tsv"))
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after the compiling warm-up)")
    p.add_argument("--epochs", type=float, default=10.0, help="epochs the cache fill is amortised over")
    p.add_argument("--cache-dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--peak-gflops", type=float, default=140.0)
    p.add_argument("--frozen", default="embed_tokens,embed_positions",
                   help="optim.frozen of both modes (default: the main job's recipe; '' trains the embeddings too)")
    return p.parse_args(argv)


def read_clips(manifest: str, n: int):
    base = Path(manifest).parent.parent
    with open(manifest, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["id"].startswith("kathleen")]
    return [(r["id"], str(base / r["path"]), float(r["duration_s"]), r["transcript"]) for r in rows[:n]]


def make_sets(clips, tok):
    from dwjax.audio import load_audio
    from dwjax.data.loader import LabelledSet
    from dwjax.data.packing import Utterance, pack
    durations = {cid: len(load_audio(path)) / 16000 for cid, path, _, _ in clips}   # exact, as the labeller does
    per_clip = LabelledSet("clips", [c[0] for c in clips], [c[1] for c in clips],
                           [tok.encode(" " + c[3]) for c in clips], ["en"] * len(clips),
                           durations=[durations[c[0]] for c in clips])
    by_id = {c[0]: c for c in clips}
    windows = pack([Utterance(c[0], durations[c[0]], c[3], "kathleen") for c in clips]).windows
    ids, tokens, members = [], [], []
    ts = lambda s: tok.timestamp_begin + int(round(s / 0.02))     # noqa: E731
    for w in windows:
        t = []
        for m in w.members:
            t += [ts(m.offset_s)] + tok.encode(" " + by_id[m.id][3]) + [ts(min(m.end_s, 30.0))]
        ids.append(w.id)
        tokens.append(t)
        members.append([{"id": m.id, "offset_s": m.offset_s, "duration_s": m.duration_s, "audio": by_id[m.id][1]}
                        for m in w.members])
    packed = LabelledSet("packed", ids, [None] * len(ids), tokens, ["en"] * len(ids), members=members,
                         prev=[-1] + list(range(len(ids) - 1)), datasets=["kathleen"] * len(ids),
                         speech_s=[sum(m["duration_s"] for m in mem) for mem in members])
    packed.set_tokenizer(tok)
    return per_clip, packed


def run_mode(name, sets, steps_lib, cfg, teacher, student, tok, args, cache=None, bucket=0,
             p_ts=0.0, p_prev=0.0, all_logits=False):
    from dwjax.data.loader import LabelEncoder, TrainBatches, label_length
    from dwjax.distill import Features
    from dwjax.flops import train_step_flops
    length = label_length(sets, 448, prev_context_probability=p_prev)
    enc = LabelEncoder(tok, length, p_ts, prev_context_probability=p_prev)
    batches = TrainBatches(sets, enc, args.batch, seed=0, workers=2, label_bucket=bucket, encoder_cache=cache)
    features = Features(teacher.cfg.n_mels, steps_lib.batch_sharding)
    state = steps_lib.init_state(student.params, jax.random.PRNGKey(0))
    tparams = steps_lib.shard_teacher(teacher.params)
    compiled, timed, speech, flops, lengths = set(), [], 0.0, 0.0, []
    step = 0
    try:
        for step, local in batches.prefetch(0):
            if all_logits:                         # logits at every position, not only the targets
                local.pop("target_positions", None)
            batch = steps_lib.put_batch(
                dict(local, input_features=features(local["audio"])) if "audio" in local else local)
            n_pos = local["labels"].shape[1]
            n_targets = local["target_positions"].shape[1] if "target_positions" in local else n_pos
            t0 = time.perf_counter()
            state, m = steps_lib.train_step(state, tparams, batch)
            jax.block_until_ready(m["loss"])
            dt = time.perf_counter() - t0
            if (n_pos, n_targets) not in compiled:       # a compiling step: not timed
                compiled.add((n_pos, n_targets))
                print(f"  {name}: step {step} compiled for {n_pos} label positions, logits at {n_targets} "
                      f"({dt:.1f} s)", flush=True)
                if len(timed) + len(compiled) > args.steps + 8:
                    break
                continue
            timed.append(dt)
            lengths.append(n_pos if n_targets == n_pos else f"{n_pos}/{n_targets}")
            speech += local["audio_seconds"]
            flops += train_step_flops(teacher.cfg, student.cfg, args.batch, n_pos, with_encoder=cache is None,
                                      frozen=cfg.optim.frozen, targets=n_targets)[1]
            print(f"  {name}: step {step} {dt:.2f} s, {n_pos} positions (logits at {n_targets}), "
                  f"{local['audio_seconds']:.1f} speech-s, "
                  f"loss {float(m['loss']):.3f}", flush=True)
            if len(timed) >= args.steps:
                break
    finally:
        batches.close()
    wall = sum(timed)
    return {"mode": name, "step_s": wall / len(timed), "speech_s_per_step": speech / len(timed),
            "speech_s_per_s": speech / wall, "mfu": flops / wall / (args.peak_gflops * 1e9),
            "compiles": len(compiled), "lengths": sorted(set(map(str, lengths)))}


def main(argv=None):
    args = parse_args(argv)
    from dwjax.config import Config, MeshConfig, OptimConfig, TrainConfig
    from dwjax.data.encoder_cache import open_cache, teacher_fingerprint
    from dwjax.distill import fill_encoder_cache
    from dwjax.mesh import make_mesh
    from dwjax.models.student import make_student
    from dwjax.train_step import make_sharded_train_step
    from dwjax.weights.loading import load_model

    teacher = load_model("builtin:whisper-base")
    tok = teacher.tokenizer
    s_cfg, s_params = make_student(teacher.cfg, teacher.params, decoder_layers=2)
    student = dataclasses.replace(teacher, cfg=s_cfg, params=s_params)
    clips = read_clips(args.manifest, args.clips)
    per_clip, packed = make_sets(clips, tok)
    speech_total = sum(c[2] for c in clips)
    print(f"{len(clips)} kathleen clips, {speech_total:.0f} s of speech; {len(packed)} packed windows "
          f"({len(clips) / len(packed):.1f} clips per window); base 6-2, batch {args.batch}, 1 device "
          f"({jax.devices()[0].device_kind}), fp32", flush=True)
    frozen = tuple(x for x in args.frozen.split(",") if x)
    cfg = Config(mesh=MeshConfig(data=1), train=TrainConfig(per_device_batch_size=args.batch),
                 optim=OptimConfig(frozen=list(frozen)))
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    steps_lib = make_sharded_train_step(cfg, mesh, s_cfg, teacher.cfg)

    results = [run_mode("per-clip", [per_clip], steps_lib, cfg, teacher, student, tok, args)]

    with tempfile.TemporaryDirectory() as tmp:
        fp = teacher_fingerprint(teacher.params["encoder"], teacher.cfg.n_mels, cfg.model.dtype)
        cache = open_cache(os.path.join(tmp, "cache"), [packed], fp, args.cache_dtype, teacher.cfg.n_audio_ctx,
                           teacher.cfg.d_model)
        tparams = steps_lib.shard_teacher(teacher.params)
        cfg_c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, encoder_cache_dtype=args.cache_dtype))
        fill_encoder_cache(cache, steps_lib, tparams, teacher.cfg.n_mels, cfg_c, args.batch, 2)   # compiles
        cache.filled[:] = 0
        cache.todo = cache.missing()
        t0 = time.perf_counter()
        fill_encoder_cache(cache, steps_lib, tparams, teacher.cfg.n_mels, cfg_c, args.batch, 2)
        fill_s = time.perf_counter() - t0
        del tparams
        packed_kw = dict(cache=cache, bucket=args.bucket, p_ts=0.5, p_prev=0.5)
        results.append(run_mode("packed+cache+bucket, logits everywhere", [packed], steps_lib, cfg, teacher,
                                student, tok, args, all_logits=True, **packed_kw))
        r = run_mode("packed+cache+bucket+target logits", [packed], steps_lib, cfg, teacher, student, tok, args,
                     **packed_kw)
    packed_speech = sum(packed.speech_s)
    epoch_steps = len(packed) / args.batch
    amortised = fill_s / args.epochs
    r["fill_s"] = fill_s
    r["speech_s_per_s_amortised"] = packed_speech / (epoch_steps * r["step_s"] + amortised)
    results.append(r)

    base = results[0]["speech_s_per_s"]
    print()
    print(f"| mode | step s | speech-s / step | speech-s/s | vs per-clip | MFU of {args.peak_gflops:g} GFLOP/s | "
          f"label positions | compiles |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['step_s']:.2f} | {r['speech_s_per_step']:.1f} | {r['speech_s_per_s']:.1f} | "
              f"{r['speech_s_per_s'] / base:.1f}x | {r['mfu']:.0%} | {','.join(map(str, r['lengths']))} | "
              f"{r['compiles']} |")
    print(f"optim.frozen: {', '.join(frozen) or 'none'} (both modes)")
    print(f"\ncache fill: {len(packed)} windows in {fill_s:.1f} s ({fill_s / len(packed):.2f} s per window); "
          f"amortised over {args.epochs:g} epochs the packed rate is {r['speech_s_per_s_amortised']:.1f} speech-s/s "
          f"({r['speech_s_per_s_amortised'] / base:.1f}x per-clip)")


if __name__ == "__main__":
    main()
