"""dwjax transcribe --model MODEL AUDIO... : one line of text per file (or segments, or JSON).

    dwjax transcribe --model builtin:whisper-base clip.flac             # prints the text
    dwjax transcribe --model builtin:whisper-base clip1.flac clip2.wav  # prints FILE<TAB>TEXT, one line per file
    dwjax transcribe --model builtin:whisper-base --timestamps --output-format json talk.mp3

Output (stdout): with one input file, its text; with several, one line per transcribed file, `FILE<TAB>TEXT`, in
the order given (--timestamps: a `# FILE` line before each file's segments; --output-format json: one object per
line with a "file" key). Progress (several files, unless --no-progress) goes to stderr, in audio-s/s.

Files that cannot be used (missing, corrupt, truncated, empty, silent, non-finite) are reported on stderr, one line
each naming the file; the others are still transcribed and printed.
Exit status: 0 when every file was transcribed; 1 when some file failed (the good ones were still printed) or
nothing could be done (a bad model, bad options); 2 for command-line usage errors.
"""
from __future__ import annotations

import argparse
import json
import sys

from dwjax.audio import SAMPLE_RATE, SILENCE_PEAK, is_silent, load_audio
from dwjax.errors import AudioError, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwjax transcribe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3)")
    p.add_argument("--model", default="builtin:whisper-base",
                   help="builtin:whisper-tiny.en, builtin:whisper-base, or a model path (dwjax, transformers, "
                        "CTranslate2 directory, OpenAI .pt)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown for several files)")
    p.add_argument("--assistant", default=None, help="a student model drafting for --model (speculative decoding)")
    p.add_argument("--timestamps", action="store_true", help="print timestamped segments")
    p.add_argument("--output-format", choices=["text", "json"], default="text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--language", default=None, help="language code or name (multilingual models); default detect")
    p.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-new-tokens", type=int, default=224)
    p.add_argument("--beams", type=int, default=1, help="beam search width (1 = greedy)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--long-form", choices=["chunked", "sequential"], default="chunked",
                   help="how audio over 30 s is transcribed: batched overlapping chunks, or OpenAI's sequential "
                        "windows with temperature fallback")
    p.add_argument("--chunk-length", type=float, default=None,
                   help="seconds per chunk for audio over 30 s (default 30 for Whisper, 15 for students)")
    return p


def read_files(paths):
    """(good: list of (path, audio)), (bad: list of (path, reason))."""
    good, bad = [], []
    for path in paths:
        try:
            audio = load_audio(path)
            if is_silent(audio):
                raise AudioError(f"{path}: audio is all silence (peak amplitude below {SILENCE_PEAK:g})")
            good.append((path, audio))
        except AudioError as e:
            bad.append((path, str(e)))
    return good, bad


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    good, bad = read_files(args.audio)
    for _, reason in bad:
        print(f"dwjax transcribe: error: {reason}", file=sys.stderr)
    if not good:
        return 1
    from dwjax.decoding.speculative import SpeculativeTranscriber  # lazy: keeps --help fast (the stage imports jax)
    from dwjax.decoding.transcribe import AudioProgress, Transcriber
    transcriber = Transcriber(args.model, dtype=args.dtype, batch_size=min(args.batch_size, len(good)))
    kw = dict(language=args.language, task=args.task, timestamps=args.timestamps,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.beams > 1:
        kw["num_beams"] = args.beams
    kw.update(chunk_length=args.chunk_length, long_form=args.long_form)
    if args.assistant:
        transcriber = SpeculativeTranscriber(transcriber, args.assistant)
    audios = [a for _, a in good]
    several = len(args.audio) > 1
    with AudioProgress([len(a) / SAMPLE_RATE for a in audios], "transcribe",
                       enabled=several and not args.no_progress) as progress:
        results = transcriber.transcribe(audios, progress=progress.callback, **kw)
    for (path, _), r in zip(good, results):
        if args.output_format == "json":
            print(json.dumps({"file": path, **r.to_dict()}, ensure_ascii=False))
        elif args.timestamps:
            print(f"# {path}")
            for s in r.segments:
                end = f"{s['end']:.2f}" if s.get("end") is not None else "?"
                print(f"[{s['start']:.2f} --> {end}] {s['text'].strip()}")
        elif several:
            print(f"{path}\t{r.text}")
        else:
            print(r.text)
    sys.stdout.flush()
    if bad:
        print(f"dwjax transcribe: {len(bad)} of {len(args.audio)} files failed (named above); the other "
              f"{len(good)} were transcribed", file=sys.stderr)
    return 1 if bad else 0
