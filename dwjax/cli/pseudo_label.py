"""dwjax pseudo-label: label datasets with a teacher on every device of every process; resumable.

    dwjax pseudo-label --teacher builtin:whisper-base --data demo/train.jsonl demo/validation.jsonl --output labels/
    dwjax pseudo-label --teacher builtin:whisper-tiny.en --data libri=manifest.tsv --output labels/ --batch-size 16 \\
        --config exp.yaml model.dtype=bfloat16
    dwjax pseudo-label --teacher builtin:whisper-base --data demo/train.jsonl --output packed/ --pack --pack-gap 0.5

--pack labels windows of <= 30 s packed from consecutive clips of one speaker (the manifest's `speaker` column;
otherwise in order), with timestamps: one row per window, its member clips, their offsets and durations in the
JSON column `members`, the references joined and the WER of the window's label against them (see
dwjax/pseudo_label/__init__.py). Unreadable, silent and over-30-s clips keep rows of their own; their neighbours
are packed.

Multi-process (one process per host, or N local CPU processes): set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID (or run under SLURM / on a TPU pod) and start the same command everywhere; every process must
see the manifests and the output directory (a shared file system). Rerunning the command resumes: rows already in
DIR's part files are skipped, also when the number of processes changed.

Writes DIR/labels-PPPPP-of-NNNNN-partKKKKK.parquet (read them with
`datasets.load_dataset("parquet", data_files="DIR/labels-*.parquet")`), DIR/labelling.json and DIR/summary.json.

Rows that cannot be labelled (missing, corrupt, truncated or empty audio, ...) are recorded with their reason in
`status` and named on stderr, one line each; every other row is still labelled and written. Silent rows are
recorded as "no speech: ..." without a label (not a failure).
Exit status: 0 when every row under DIR is labelled or no-speech; 1 when DIR holds failed rows (everything else
was labelled and written; a rerun into the same DIR does not retry them) or nothing could be done (one line on
stderr says why); 2 for usage errors. In a multi-process run process 0 reports the whole run; the other
processes exit 0 once their rows are written.
"""
from __future__ import annotations

import argparse
import sys

from dwjax.config import add_config_args
from dwjax.data.packing import DEFAULT_PACK_S


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwjax pseudo-label", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="builtin:whisper-tiny.en, builtin:whisper-base or a model path (default: model.teacher)")
    p.add_argument("--data", nargs="+", required=True, metavar="DATA",
                   help="manifests or datasets (JSONL/CSV/TSV/parquet/arrow/save_to_disk dir), each PATH or NAME=PATH")
    p.add_argument("--output", required=True, metavar="DIR", help="directory of the label part files")
    p.add_argument("--batch-size", type=int, default=None, metavar="PER_DEVICE",
                   help="examples per device per step (default: train.eval_batch_size)")
    p.add_argument("--timestamps", action="store_true", help="predict timestamps (segments go in `timestamps`)")
    p.add_argument("--language", default=None, metavar="L",
                   help="force a language (multilingual teachers); default: the manifest's, else detected per row")
    p.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    p.add_argument("--num-beams", type=int, default=1, metavar="N", help="beam width (1 = greedy, sharded)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="decoding budget (default: 224; with --pack 448, the decoder context, less the prompt)")
    p.add_argument("--pack", action="store_true",
                   help="label packed windows of consecutive clips, with timestamps (one row per window)")
    p.add_argument("--pack-gap", type=float, default=0.5, metavar="S",
                   help="seconds of silence between packed clips (default: 0.5)")
    p.add_argument("--pack-max", type=float, default=DEFAULT_PACK_S, metavar="S",
                   help=f"longest packed window in seconds, at most 30 (default: {DEFAULT_PACK_S:g}: the teacher "
                        "drops the last utterances of windows filled to 30 s; dwjax/data/packing.py)")
    p.add_argument("--pack-short", type=float, default=0.0, metavar="F",
                   help="fraction of windows filled only to a random length in (0, --pack-max], one clip or a few, "
                        "so a student trained on them also meets short audio followed by silence (default: 0)")
    p.add_argument("--commit-every", type=int, default=8, metavar="N",
                   help="write a part file every N global batches (what an interruption can lose)")
    p.add_argument("--workers", type=int, default=None,
                   help="audio decoding threads per process (default: data.num_workers)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dwjax.mesh import initialize_distributed
    initialize_distributed()                      # first: before anything touches JAX devices
    from dwjax.config import config_from_args
    from dwjax.pseudo_label import LabelOptions, label_datasets
    cfg = config_from_args(args)
    opts = LabelOptions(
        teacher=args.teacher or cfg.model.teacher,
        output=args.output,
        batch_size=args.batch_size if args.batch_size is not None else cfg.train.eval_batch_size,
        timestamps=args.timestamps or args.pack,
        language=args.language,
        task=args.task,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else (448 if args.pack else 224),
        dtype=cfg.model.dtype,
        scan_layers=cfg.model.scan_layers,
        commit_every=args.commit_every,
        num_workers=args.workers if args.workers is not None else cfg.data.num_workers,
        progress=not args.no_progress,
        pack=args.pack,
        pack_gap_s=args.pack_gap,
        pack_max_s=args.pack_max,
        pack_short=args.pack_short,
    )
    summary = label_datasets(args.data, opts, cfg)
    failed = (summary or {}).get("overall", {}).get("failed", 0)
    if failed:
        rows = summary["overall"]["rows"]
        kinds = "; ".join(f"{n} x {kind}" for kind, n in summary["overall"]["failures"].items())
        print(f"dwjax pseudo-label: {failed} of {rows} rows under {opts.output} failed and have no label ({kinds}); "
              "their reasons are in the `status` column", file=sys.stderr)
        return 1
    return 0
