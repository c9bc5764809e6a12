"""Short-form transcription speed: dwjax vs transformers (PyTorch) vs faster-whisper, same weights, same clips.

    python benchmarks/bench_transcribe.py [--model builtin:whisper-base] [--clips 24] [--batch-sizes 1,8]

All three run greedy, fp32, without timestamps, on the same synthesised utterances (flite/espeak-ng, made once
under --data). Prints audio-seconds per second for each, the ratios dwjax/peer, and agreement of transcripts.
Warm-up: each engine transcribes the set once before it is timed (dwjax compiles per batch bucket then).
Whisper pads every clip to 30 s, so the encoder over 30 s windows dominates: the physical limit printed is
the encoder's FLOPs per window at this CPU's peak (DWJAX_PEAK_FLOPS, default 140 GFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _progress import progress, tick


def ensure_data(directory: Path, clips: int) -> list[dict]:
    from dwjax.demo.synthesis import make_demo_data
    from dwjax.data.manifest import read_dataset
    if not (directory / "test.jsonl").exists():
        make_demo_data(directory, hours=clips * 6.0 / 3600 * 1.05, seed=1234, splits={"test": 1.0},
                       progress=False)
    rows = read_dataset(directory / "test.jsonl")[:clips]
    return rows


def ct2_dir(model: str) -> str:
    """A directory faster-whisper can open for a builtin model (parts concatenated)."""
    from dwjax.weights.loading import _builtin
    directory, paths = _builtin(model)
    if len(paths) == 1:
        return str(directory)
    tmp = Path(tempfile.mkdtemp(prefix="dwjax-ct2-"))
    with open(tmp / "model.bin", "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out)
    for name in ("config.json", "vocabulary.txt", "tokenizer.json"):
        if (directory / name).exists():
            shutil.copy(directory / name, tmp / name)
    return str(tmp)


def timed(fn, repeats=1, done=lambda t: None):
    """Best of `repeats` runs after a warm-up; `done(seconds)` after each run, outside its timing (None: warm-up)."""
    fn()  # warm-up
    done(None)
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        t = time.perf_counter() - t0
        best = min(best, t)
        done(t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:whisper-base")
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "dwjax-bench-utterances"))
    ap.add_argument("--skip", default="", help="comma list of engines to skip: transformers,faster-whisper")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    from dwjax.audio import load_audio
    from dwjax.decoding.transcribe import Transcriber
    from dwjax.flops import encoder_flops, peak_flops
    from dwjax.text.wer import wer
    from dwjax.weights.loading import load_model

    rows = ensure_data(Path(args.data), args.clips)
    audio = [load_audio(r.audio_path) for r in rows]
    refs = [r.text for r in rows]
    seconds = sum(len(a) for a in audio) / 16000
    loaded = load_model(args.model)
    multilingual = loaded.tokenizer.is_multilingual
    skip = set(filter(None, args.skip.split(",")))
    results = []
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    engines = 1 + ("transformers" not in skip) + ("faster-whisper" not in skip)
    bar = progress(seconds * len(sizes) * engines * 2, "bench_transcribe", unit="audio-s")   # warm-up + 1 timed

    def done(engine, bs):
        return lambda t: tick(bar, seconds, f"{engine} b{bs}: " +
                              ("warm-up" if t is None else f"{seconds / t:.2f} audio-s/s"))

    for bs in sizes:
        tr = Transcriber(loaded, batch_size=bs)
        kw = {"language": "en"} if multilingual else {}
        t, out = timed(lambda: [r.text for r in tr.transcribe(audio, **kw)], done=done("dwjax", bs))
        dw = out
        results.append(dict(engine="dwjax", batch=bs, seconds=t, audio_s_per_s=seconds / t, wer=100 * wer(refs, out)))

        if "transformers" not in skip:
            import torch
            from transformers import WhisperForConditionalGeneration, WhisperProcessor
            hf_dir = Path(tempfile.mkdtemp(prefix="dwjax-hf-"))
            from dwjax.weights.export import export_model
            export_model(loaded, "hf", hf_dir, overwrite=True)
            model = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
            proc = WhisperProcessor.from_pretrained(hf_dir)
            torch.set_num_threads(os.cpu_count() or 2)

            def run_hf():
                texts = []
                for i in range(0, len(audio), bs):
                    feats = proc.feature_extractor(audio[i:i + bs], sampling_rate=16000, return_tensors="pt")
                    with torch.inference_mode():
                        gen = model.generate(feats.input_features, max_new_tokens=224,
                                             **({"language": "en", "task": "transcribe"} if multilingual else {}))
                    texts += [s.strip() for s in proc.batch_decode(gen, skip_special_tokens=True)]
                return texts
            t, out = timed(run_hf, done=done("transformers", bs))
            results.append(dict(engine="transformers", batch=bs, seconds=t, audio_s_per_s=seconds / t,
                                wer=100 * wer(refs, out), same_as_dwjax=float(np.mean([a == b for a, b in zip(out, dw)]))))

        if "faster-whisper" not in skip:
            from faster_whisper import BatchedInferencePipeline, WhisperModel
            fw = WhisperModel(ct2_dir(args.model), device="cpu", compute_type="float32",
                              cpu_threads=os.cpu_count() or 2)
            lang = "en" if multilingual else None

            def run_fw():
                if bs == 1:
                    return [" ".join(s.text.strip() for s in fw.transcribe(a, beam_size=1, language=lang,
                                                                            without_timestamps=True,
                                                                            condition_on_previous_text=False)[0])
                            for a in audio]
                pipe = BatchedInferencePipeline(fw)
                texts = []
                for a in audio:   # the batched pipeline batches chunks of one file; clips are < 30 s: batch files
                    segs, _ = pipe.transcribe(a, batch_size=bs, beam_size=1, language=lang, without_timestamps=True,
                                              vad_filter=False)
                    texts.append(" ".join(s.text.strip() for s in segs))
                return texts
            t, out = timed(run_fw, done=done("faster-whisper", bs))
            results.append(dict(engine="faster-whisper", batch=bs, seconds=t, audio_s_per_s=seconds / t,
                                wer=100 * wer(refs, out), same_as_dwjax=float(np.mean([a == b for a, b in zip(out, dw)]))))

    bar.close()
    limit = peak_flops() / encoder_flops(loaded.cfg) * (seconds / len(audio))
    print(f"\n{len(audio)} clips, {seconds:.1f} s of audio, model {args.model}, fp32 greedy")
    print(f"encoder-bound limit at {peak_flops() / 1e9:.0f} GFLOP/s: {limit:.2f} audio-s/s "
          f"({encoder_flops(loaded.cfg) / 1e9:.1f} GFLOP per 30 s window)\n")
    print("| engine | batch | audio-s/s | dwjax / engine | WER % | same text as dwjax |")
    print("|---|---|---|---|---|---|")
    for r in results:
        dwr = next(x for x in results if x["engine"] == "dwjax" and x["batch"] == r["batch"])
        print(f"| {r['engine']} | {r['batch']} | {r['audio_s_per_s']:.2f} | "
              f"{dwr['audio_s_per_s'] / r['audio_s_per_s']:.2f}x | {r['wer']:.2f} | "
              f"{r.get('same_as_dwjax', 1.0):.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
