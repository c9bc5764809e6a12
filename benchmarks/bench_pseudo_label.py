"""Pseudo-labelling throughput: dwjax's labeller vs faster-whisper's BatchedInferencePipeline, same weights,
each clip in its own 30 s window and packed (several clips in one window).

    python benchmarks/bench_pseudo_label.py                       # makes a >= 10 min demo set if missing
    python benchmarks/bench_pseudo_label.py --data demo/ --limit 64 --batch 8

Both engines label the same clips with the builtin whisper-base weights (faster-whisper reads the same CTranslate2
model.bin, its two parts concatenated into a temporary directory): fp32, greedy (beam 1, temperature 0, no
fallback), batch 8, no timestamps, no VAD, language forced to English, each clip its own 30 s window. Each engine
runs in its own child process (so peak RSS is its own); wall time includes reading the audio. dwjax compiles on a
warm-up batch first (persistent compilation cache), so the timed run measures steady-state labelling.
Packed engines: `dwjax-packed` is `dwjax pseudo-label --pack` (consecutive clips joined into <= 30 s windows with
0.5 s gaps, decoded with timestamps, 448 new tokens at most); `faster-whisper-vad` gives the pipeline every clip
joined into one recording and lets its own VAD cut it into <= 30 s chunks (vad_filter=True, chunk_length 30). The
packed engines' WER is scored on the joined texts (dwjax: each window against its members' joined references;
faster-whisper-vad: the whole recording against all references). Audio seconds count the clips, never the gaps.
Prints audio seconds per wall second for each, their ratio and each process's peak RSS. Progress goes to stderr:
dwjax's labeller shows its own bar (as `dwjax pseudo-label` does); faster-whisper's bar advances after each batch,
outside its timing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _progress import progress, tick  # noqa: E402

DEFAULT_DATA = Path(tempfile.gettempdir()) / "dwjax-bench-demo"
MODEL = "builtin:whisper-base"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def manifests(data: Path) -> list[Path]:
    if data.is_file():
        return [data]
    found = sorted(p for p in data.glob("*.jsonl"))
    if not found:
        raise SystemExit(f"{data}: no *.jsonl manifests")
    return found


def ensure_demo(data: Path, minutes: float) -> None:
    if data.is_file() or (data.is_dir() and any(data.glob("*.jsonl"))):
        return
    from dwjax.demo.synthesis import make_demo_data
    print(f"making a {minutes:.0f}-minute demo set in {data} ...", flush=True)
    make_demo_data(output=str(data), hours=minutes / 60, progress=False)


def subset(data: Path, limit: int | None, work: Path) -> Path:
    """One JSONL manifest of the first `limit` rows (all when None), audio paths made absolute."""
    from dwjax.data.manifest import read_dataset, write_manifest
    rows = [e for m in manifests(data) for e in read_dataset(f"{m.stem}={m}")]
    rows = sorted(rows, key=lambda e: (e.dataset, e.id))[:limit]
    out = work / "bench.jsonl"
    write_manifest(out, [{"id": f"{e.dataset}/{e.id}", "audio": os.path.abspath(e.audio_path), "text": e.text}
                         for e in rows])
    return out


# ------------------------------------------------------------------------------------------ engines (children)


def run_dwjax(manifest: Path, batch: int, work: Path, packed: bool = False) -> dict:
    import jax
    jax.config.update("jax_compilation_cache_dir", str(work / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from dwjax.data.manifest import read_dataset, write_manifest
    from dwjax.pseudo_label import LabelOptions, label_datasets
    n_dev = jax.device_count()
    per_device = max(1, batch // n_dev)
    rows = read_dataset(manifest)
    warm = work / "warm.jsonl"
    write_manifest(warm, [{"id": e.id, "audio": e.audio_path, "text": e.text} for e in rows[: per_device * n_dev]])
    opts = dict(teacher=MODEL, batch_size=per_device, language="en", commit_every=1000)
    if packed:
        opts.update(pack=True, timestamps=True, max_new_tokens=448)
    t = time.time()
    label_datasets([f"bench={warm}"], LabelOptions(output=str(work / "warm-out"), progress=False, **opts))
    warm_s = time.time() - t
    t = time.time()   # the labeller's own bar (the CLI's default) on stderr: one update per fetched batch
    summary = label_datasets([f"bench={manifest}"], LabelOptions(output=str(work / "out"), progress=True, **opts))
    wall = time.time() - t
    o = summary["overall"]
    return {"engine": "dwjax-packed" if packed else "dwjax", "device": f"{jax.devices()[0].device_kind} x{n_dev}",
            "clips": o.get("packed_clips") or o["rows"], "windows": o.get("windows"),
            "audio_s": o["audio_hours"] * 3600, "wall_s": wall, "warmup_s": warm_s,
            "corpus_wer": (o["wer"] or {}).get("corpus"), "peak_rss_mb": peak_rss_mb()}


def _ct2_dir(work: Path) -> Path:
    """The builtin whisper-base CTranslate2 directory with its two model.bin parts joined (for faster-whisper)."""
    from dwjax.weights.loading import _builtin
    directory, parts = _builtin(MODEL)
    out = work / "whisper-base-ct2"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.bin", "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
    for name in os.listdir(directory):
        if not name.startswith("model.bin") and (directory / name).is_file():
            shutil.copy(directory / name, out / name)
    return out


def _fw_pipeline(work: Path):
    """faster-whisper's BatchedInferencePipeline over the builtin base weights, fp32; (pipeline, device)."""
    import ctranslate2
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    model = WhisperModel(str(_ct2_dir(work)), device=device, compute_type="float32",
                         cpu_threads=os.cpu_count() or 1)
    return BatchedInferencePipeline(model), device


def run_faster_whisper(manifest: Path, batch: int, work: Path) -> dict:
    import ctranslate2
    import numpy as np

    from dwjax.audio import load_audio
    from dwjax.data.manifest import read_dataset
    from dwjax.text.wer import error_rates
    pipe, device = _fw_pipeline(work)
    rows = read_dataset(manifest)
    kw = dict(language="en", task="transcribe", beam_size=1, best_of=1, temperature=0.0, without_timestamps=True,
              vad_filter=False, condition_on_previous_text=False, batch_size=batch, log_progress=False)
    warm = load_audio(rows[0].audio_path)
    list(pipe.transcribe(warm, clip_timestamps=[{"start": 0.0, "end": len(warm) / 16000}], **kw)[0])
    bar = progress(len(rows), "faster-whisper", unit="clip")
    hyps, audio_s, wall = [], 0.0, 0.0
    for start in range(0, len(rows), batch):      # a batch of clips: one array, one clip timestamp per clip
        t = time.time()                           # timed per batch: the progress bar's update stays outside
        clips = [load_audio(e.audio_path) for e in rows[start: start + batch]]
        bounds, offset = [], 0.0
        for c in clips:
            bounds.append({"start": offset, "end": offset + len(c) / 16000})
            offset += len(c) / 16000
        segments, _ = pipe.transcribe(np.concatenate(clips), clip_timestamps=bounds, **kw)
        segs = list(segments)
        audio_s += offset
        hyps.append(" ".join(s.text.strip() for s in segs))
        wall += time.time() - t
        tick(bar, len(clips), f"{audio_s / wall:.2f} audio-s/s")
    bar.close()
    refs = [" ".join(e.text or "" for e in rows[s: s + batch]) for s in range(0, len(rows), batch)]
    return {"engine": "faster-whisper", "device": f"{device} (ctranslate2 {ctranslate2.__version__})",
            "clips": len(rows), "audio_s": audio_s, "wall_s": wall, "warmup_s": None,
            "corpus_wer": error_rates(refs, hyps)["wer"], "peak_rss_mb": peak_rss_mb()}


def run_faster_whisper_vad(manifest: Path, batch: int, work: Path) -> dict:
    """The clips joined into one recording; the pipeline's VAD packs speech into <= 30 s chunks, batch `batch`."""
    import ctranslate2
    import numpy as np

    from dwjax.audio import load_audio
    from dwjax.data.manifest import read_dataset
    from dwjax.text.wer import error_rates
    pipe, device = _fw_pipeline(work)
    rows = read_dataset(manifest)
    kw = dict(language="en", task="transcribe", beam_size=1, best_of=1, temperature=0.0, without_timestamps=True,
              vad_filter=True, chunk_length=30, condition_on_previous_text=False, batch_size=batch,
              log_progress=False)
    warm = load_audio(rows[0].audio_path)
    list(pipe.transcribe(np.concatenate([warm] * 4), **kw)[0])
    t = time.time()                               # reading the audio is timed, as for the other engines
    recording = np.concatenate([load_audio(e.audio_path) for e in rows])
    audio_s = len(recording) / 16000
    bar = progress(audio_s, "faster-whisper-vad", unit="audio-s")
    segments, _ = pipe.transcribe(recording, **kw)
    hyps = []
    for seg in segments:                          # segments arrive as their batches finish
        hyps.append(seg.text.strip())
        bar.n = min(audio_s, seg.end)
        bar.refresh()
    wall = time.time() - t
    bar.close()
    refs = [" ".join(e.text or "" for e in rows)]
    return {"engine": "faster-whisper-vad", "device": f"{device} (ctranslate2 {ctranslate2.__version__})",
            "clips": len(rows), "audio_s": audio_s, "wall_s": wall, "warmup_s": None,
            "corpus_wer": error_rates(refs, [" ".join(hyps)])["wer"], "peak_rss_mb": peak_rss_mb()}


ENGINES = {"dwjax": run_dwjax, "dwjax-packed": lambda m, b, w: run_dwjax(m, b, w, packed=True),
           "faster-whisper": run_faster_whisper, "faster-whisper-vad": run_faster_whisper_vad}


# ------------------------------------------------------------------------------------------ parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help=f"manifest or demo directory (default {DEFAULT_DATA})")
    p.add_argument("--minutes", type=float, default=10.5, help="size of the demo set made when --data is missing")
    p.add_argument("--limit", type=int, default=None, help="label only the first N clips")
    p.add_argument("--batch", type=int, default=8, help="global batch (both engines)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--engine", help=argparse.SUPPRESS)      # child mode
    p.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        fn = ENGINES[args.engine]
        print("RESULT " + json.dumps(fn(args.manifest, args.batch, args.work)), flush=True)
        return 0
    ensure_demo(args.data, args.minutes)
    results = []
    with tempfile.TemporaryDirectory(prefix="dwjax-bench-") as tmp:
        work = Path(tmp)
        manifest = subset(args.data, args.limit, work)
        for engine in args.engines.split(","):
            if engine not in ENGINES:
                raise SystemExit(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
            (work / engine).mkdir()
            cmd = [sys.executable, __file__, "--engine", engine, "--manifest", str(manifest), "--work",
                   str(work / engine), "--batch", str(args.batch)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)    # stderr (progress, errors) passes
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-4000:], file=sys.stderr)
                raise SystemExit(f"{engine} failed (exit {proc.returncode}; its stderr is above)")
            results.append(json.loads(lines[-1][7:]))
    print(f"\n{'engine':<16} {'device':<28} {'clips':>6} {'audio s':>9} {'wall s':>8} {'audio s/s':>10} "
          f"{'WER %':>6} {'peak RSS MB':>12}")
    for r in results:
        wer = "-" if r["corpus_wer"] is None else f"{100 * r['corpus_wer']:.1f}"
        print(f"{r['engine']:<16} {r['device'][:28]:<28} {r['clips']:>6} {r['audio_s']:>9.1f} {r['wall_s']:>8.1f} "
              f"{r['audio_s'] / r['wall_s']:>10.2f} {wer:>6} {r['peak_rss_mb']:>12.0f}")
    speed = {r["engine"]: r["audio_s"] / r["wall_s"] for r in results}
    wers = {r["engine"]: r["corpus_wer"] for r in results}
    if "dwjax-packed" in speed:
        print()
        for other in speed:
            if other != "dwjax-packed":
                dw = "" if wers.get(other) is None or wers["dwjax-packed"] is None else (
                    f"  (WER {100 * wers['dwjax-packed']:.1f} vs {100 * wers[other]:.1f})")
                print(f"throughput ratio dwjax-packed / {other}: {speed['dwjax-packed'] / speed[other]:.2f}x{dw}")
    elif len(results) == 2:
        a, b = speed.values()
        print(f"\nthroughput ratio {results[0]['engine']} / {results[1]['engine']}: {a / b:.2f}x")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
