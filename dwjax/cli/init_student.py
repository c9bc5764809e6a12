"""`dwjax init-student`: a student model directory from a teacher's encoder and spaced decoder layers.

    dwjax init-student --teacher builtin:whisper-tiny.en --decoder-layers 2 --output students/tiny-2
    dwjax init-student --teacher openai-large-v2/ --decoder-layer-ids 0,31 --output students/large-2

The output is a dwjax model directory (`load_model` reads it; `model.student` of a distillation config names it)
whose metadata records the teacher and the teacher layer ids each student layer came from, and whose
checksums.sha256 records the sha256 of params.safetensors (`load_model` verifies it; files get the user's umask).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dwjax.errors import UserError
from dwjax.models.student import make_student, student_layer_ids
from dwjax.models.whisper import count_params

_WRITTEN = ("params.safetensors", "vocabulary.txt", "dwjax_config.json", "checksums.sha256")


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwjax init-student",
        description="Copy the teacher's encoder (whole, or --encoder-layers spaced layers), embeddings and final "
                    "norms, and decoder layers taken at floor(linspace(0, L-1, N)) with the last forced to L-1 "
                    "(or the explicit --decoder-layer-ids), into a new dwjax model directory.")
    parser.add_argument("--teacher", required=True, metavar="MODEL", help="builtin:NAME or a model path")
    parser.add_argument("--decoder-layers", type=int, metavar="N", help="number of student decoder layers")
    parser.add_argument("--decoder-layer-ids", type=_ids, metavar="I,J,..",
                        help="teacher decoder layers to copy, in order (instead of, or matching, --decoder-layers)")
    parser.add_argument("--encoder-layers", type=int, metavar="M",
                        help="keep only M spaced encoder layers (default: the whole teacher encoder)")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write the student to")
    parser.add_argument("--overwrite", action="store_true", help="write into DIR even if it is not empty")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.decoder_layers is None and args.decoder_layer_ids is None:
        raise UserError("give --decoder-layers N or --decoder-layer-ids I,J,..")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--output {out} is not empty: choose another directory or pass --overwrite")

    from dwjax.weights.export import check_writable  # lazy: keeps --help fast (the stage imports jax)
    from dwjax.weights.loading import load_model, save_dwjax
    check_writable(out)                                   # before the teacher is loaded
    teacher = load_model(args.teacher)
    choice = dict(decoder_layers=args.decoder_layers, decoder_layer_ids=args.decoder_layer_ids,
                  encoder_layers=args.encoder_layers)
    ids = student_layer_ids(teacher.cfg, **choice)        # raises ConfigError (a UserError) on bad ids
    cfg, params = make_student(teacher.cfg, teacher.params, **choice)

    if out.is_dir() and args.overwrite:
        for name in _WRITTEN:
            (out / name).unlink(missing_ok=True)
    metadata = {"kind": "student", "teacher": args.teacher, "teacher_source": teacher.source,
                "teacher_config": teacher.cfg.to_dict(), "encoder_layer_ids": ids["encoder"],
                "decoder_layer_ids": ids["decoder"]}
    save_dwjax(out, cfg, params, teacher.tokenizer, teacher.generation, metadata)
    print(f"dwjax init-student: {out}: encoder layers {ids['encoder']} of {teacher.cfg.encoder_layers}, "
          f"decoder layers {ids['decoder']} of {teacher.cfg.decoder_layers}; "
          f"{count_params(params) / 1e6:.1f}M parameters (teacher {count_params(teacher.params) / 1e6:.1f}M)")
    return 0
