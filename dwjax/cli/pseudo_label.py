"""dwjax pseudo-label: label datasets with a teacher on every device of every process; resumable.

    dwjax pseudo-label --teacher builtin:whisper-base --data demo/train.jsonl demo/validation.jsonl --output labels/
    dwjax pseudo-label --teacher builtin:whisper-tiny.en --data libri=manifest.tsv --output labels/ --batch-size 16 \\
        --config exp.yaml model.dtype=bfloat16
    dwjax pseudo-label --teacher builtin:whisper-base --data demo/train.jsonl --output packed/ --pack --pack-gap 0.5
    dwjax pseudo-label --config label.yaml label.batch_size=32

Every option is a key of the config's `label:` section (--data is label.data, --pack-gap label.pack_gap_s, ...;
--teacher is model.teacher, --workers data.num_workers): a flag given overrides the config files, and KEY=VALUE
overrides override both. `python -c "from dwjax.config import *; print(to_yaml(Config(), True))"` lists them.

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

from dwjax.config import LabelConfig, add_config_args, config_from_args, field_doc


def _doc(name: str) -> str:
    return f"{field_doc(LabelConfig, name)}; default: {getattr(LabelConfig, name)!r}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwjax pseudo-label", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", metavar="MODEL",
                   help="builtin:whisper-tiny.en, builtin:whisper-base or a model path (default: model.teacher)")
    p.add_argument("--data", nargs="+", metavar="DATA", help=field_doc(LabelConfig, "data"))
    p.add_argument("--output", metavar="DIR", help=field_doc(LabelConfig, "output"))
    p.add_argument("--batch-size", type=int, metavar="PER_DEVICE", help=_doc("batch_size"))
    p.add_argument("--timestamps", action="store_true", default=None, help=field_doc(LabelConfig, "timestamps"))
    p.add_argument("--language", metavar="L", help=field_doc(LabelConfig, "language"))
    p.add_argument("--task", choices=["transcribe", "translate"], help=_doc("task"))
    p.add_argument("--num-beams", type=int, metavar="N", help=_doc("num_beams"))
    p.add_argument("--max-new-tokens", type=int, help=field_doc(LabelConfig, "max_new_tokens"))
    p.add_argument("--pack", action="store_true", default=None, help=field_doc(LabelConfig, "pack"))
    p.add_argument("--pack-gap", type=float, metavar="S", help=_doc("pack_gap_s"))
    p.add_argument("--pack-max", type=float, metavar="S", help=_doc("pack_max_s"))
    p.add_argument("--pack-short", type=float, metavar="F", help=_doc("pack_short"))
    p.add_argument("--commit-every", type=int, metavar="N", help=_doc("commit_every"))
    p.add_argument("--workers", type=int, help="audio decoding threads per process (default: data.num_workers)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_args(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dwjax.mesh import initialize_distributed  # lazy: keeps --help fast (imports jax)
    initialize_distributed()                      # first: before anything touches JAX devices
    from dwjax.pseudo_label import LabelOptions, label_datasets  # lazy: keeps --help fast (the stage imports jax)
    label = dict(data=args.data, output=args.output, batch_size=args.batch_size, timestamps=args.timestamps,
                 language=args.language, task=args.task, num_beams=args.num_beams,
                 max_new_tokens=args.max_new_tokens, pack=args.pack, pack_gap_s=args.pack_gap,
                 pack_max_s=args.pack_max, pack_short=args.pack_short, commit_every=args.commit_every)
    cfg = config_from_args(args, {"label": label, "model": {"teacher": args.teacher},
                                  "data": {"num_workers": args.workers}})
    if not cfg.label.data or not cfg.label.output:
        parser.error("the data to label and the output directory are required: --data and --output "
                     "(or label.data and label.output)")
    opts = LabelOptions.from_config(cfg, progress=not args.no_progress)
    summary = label_datasets(list(cfg.label.data), opts, cfg)
    failed = (summary or {}).get("overall", {}).get("failed", 0)
    if failed:
        rows = summary["overall"]["rows"]
        kinds = "; ".join(f"{n} x {kind}" for kind, n in summary["overall"]["failures"].items())
        print(f"dwjax pseudo-label: {failed} of {rows} rows under {opts.output} failed and have no label ({kinds}); "
              "their reasons are in the `status` column", file=sys.stderr)
        return 1
    return 0
