"""`dwjax make-demo-data`: synthesise a small speech dataset with flite and espeak-ng (English, or several
languages with --languages en,de,fr,es,it)."""
from __future__ import annotations

import argparse
import os

from dwjax.demo.synthesis import DEFAULT_SPLITS, ESPEAK_LANGUAGE_VOICES, make_demo_data, parse_splits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwjax make-demo-data",
        description="Speak generated (or given) sentences with flite and espeak-ng voices and write "
                    "DIR/audio/*.flac (16 kHz mono) plus DIR/{train,validation,test}.jsonl manifests. "
                    "Deterministic for a seed; a rerun skips clips that already exist.",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="where to write audio/ and the manifests")
    parser.add_argument("--hours", type=float, default=0.25, help="amount of audio to make (default 0.25)")
    parser.add_argument("--text", metavar="FILE", help="speak these lines (one sentence a line) instead of generated ones")
    parser.add_argument("--noise", action="store_true",
                        help="add white/pink noise (10-30 dB SNR) or reverb to about half of the clips")
    parser.add_argument("--seed", type=int, default=0, help="seed for sentences, voices and effects (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel synthesis processes (default: number of cores)")
    parser.add_argument("--splits", default=DEFAULT_SPLITS, help=f"split fractions (default {DEFAULT_SPLITS})")
    parser.add_argument("--languages", default="en", metavar="L1,L2,...",
                        help="languages to speak, about equal audio each (default en; also "
                             f"{', '.join(sorted(ESPEAK_LANGUAGE_VOICES))}: espeak-ng voices, sentences written "
                             "for the demo, and <split>.translate.jsonl manifests with English translations)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    summary = make_demo_data(
        output=args.output,
        hours=args.hours,
        text_file=args.text,
        noise=args.noise,
        seed=args.seed,
        workers=max(1, args.workers),
        splits=parse_splits(args.splits),
        progress=not args.no_progress,
        languages=args.languages,
    )
    print("\n".join(summary.lines()))
    return 0
