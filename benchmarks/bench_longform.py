"""Long-form transcription speed and WER: chunked (batched) and sequential, teacher vs a distilled student.

    python benchmarks/bench_longform.py --student runs/demo-base/distill/student
    python benchmarks/bench_longform.py --teacher builtin:whisper-tiny.en --student runs/demo/distill/student

One recording of >= 3 minutes: real clips of ../shared/data/real (synthesised speech where that is absent) joined
with 0.4 s pauses; its reference is their transcripts joined. Each model transcribes it chunked (its default chunk
length: 30 s for Whisper, 15 s for a student, batch 8) and the teacher also sequentially (OpenAI's algorithm);
the clips are also transcribed one by one (short-form) for the WER each long-form method should stay close to.
Prints wall time after a warm-up run (compilation excluded), the real-time factor RTF = wall / audio seconds, the
student's speed-up over the teacher and the normalised WER. Asserts nothing about timing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _progress import echo, progress, tick  # noqa: E402


def timed(fn, done=lambda t: None):
    """One run after a warm-up; `done(seconds)` after each run, outside its timing (None: the warm-up)."""
    fn()                                   # compile / warm up
    done(None)
    t0 = time.perf_counter()
    out = fn()
    t = time.perf_counter() - t0
    done(t)
    return t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="builtin:whisper-base")
    ap.add_argument("--student", required=True, help="a distilled student (dwjax model directory)")
    ap.add_argument("--clips", type=int, default=52, help="clips joined into the recording (52 real: ~3.5 min)")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)

    from dwjax.audio import SAMPLE_RATE
    from dwjax.decoding.longform import transcribe_long
    from dwjax.decoding.transcribe import Transcriber
    from dwjax.text.wer import wer

    from tests.helpers import long_recording
    clips, audio = long_recording(args.clips)
    seconds = len(audio) / SAMPLE_RATE
    reference = " ".join(t for t, _ in clips)
    print(f"recording: {len(clips)} clips, {seconds:.1f} s; batch {args.batch}")
    rows = []
    walls = {}
    short_s = sum(len(a) for _, a in clips) / SAMPLE_RATE
    bar = progress(2 * (2 * short_s + 3 * seconds), "bench_longform", unit="audio-s")   # warm-up + timed, 5 cases

    def done(label, audio_s):
        return lambda t: tick(bar, audio_s, f"{label}: " + ("warm-up" if t is None else f"{audio_s / t:.2f} audio-s/s"))

    for who, name in (("teacher", args.teacher), ("student", args.student)):
        tr = Transcriber(name, batch_size=args.batch)
        short_wall, short = timed(lambda: tr.transcribe([a for _, a in clips]), done(f"{who} short-form", short_s))
        rows.append((who, "short-form (clip by clip)", short_wall, wer([reference], [" ".join(r.text for r in short)])))
        methods = [("chunked", {})] + ([("sequential", {})] if who == "teacher" else [])
        for method, kw in methods:
            wall, out = timed(lambda: transcribe_long(tr, audio, method=method, **kw),
                              done(f"{who} {method}", seconds))
            walls[(who, method)] = wall
            rows.append((who, method, wall, wer([reference], [out.text])))
        echo(f"  {who} done")
    bar.close()
    print()
    print("| model | method | wall s | RTF | x real time | WER % |")
    print("|---|---|---|---|---|---|")
    for who, method, wall, w in rows:
        print(f"| {who} | {method} | {wall:.1f} | {wall / seconds:.3f} | {seconds / wall:.1f} | {100 * w:.2f} |")
    print(f"\nstudent / teacher speed-up, chunked: {walls[('teacher', 'chunked')] / walls[('student', 'chunked')]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
