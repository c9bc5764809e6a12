"""`dwjax export`: write a model as transformers, CTranslate2 (faster-whisper) or OpenAI files.

Each output directory carries `checksums.sha256` (the sha256 of its weight file), checked by `load_model`. The
hf and ctranslate2 formats need `tokenizers` (installed with dwjax); openai needs torch (`pip install torch`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dwjax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwjax export",
        description="Write a model in another tool's format: 'hf' (transformers WhisperForConditionalGeneration, "
                    "pipeline-ready), 'ctranslate2' (faster-whisper) or 'openai' (a .pt for openai-whisper). "
                    "The output directory is written all at once; a failed export leaves nothing behind.",
    )
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="builtin:whisper-tiny.en, builtin:whisper-base, or a dwjax / transformers / "
                             "CTranslate2 model directory, or an OpenAI .pt file")
    parser.add_argument("--format", required=True, dest="fmt", metavar="{hf,ctranslate2,openai}",
                        help="output format")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--dtype", default="float32", metavar="{float32,float16}",
                        help="weight precision (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--decoder-only", action="store_true",
                        help="hf only: write the decoder as a WhisperForCausalLM, for use as a transformers "
                             "assistant_model next to a model with the same encoder")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from dwjax.weights import export  # lazy: keeps --help fast (the stage imports jax)

    # cheap checks first: no model is loaded for a command that cannot succeed
    if args.fmt not in export.FORMATS:
        raise UserError(f"unknown --format {args.fmt!r}; choose one of {', '.join(export.FORMATS)}")
    if args.dtype not in export.DTYPES:
        raise UserError(f"unknown --dtype {args.dtype!r}; choose float32 or float16")
    if args.decoder_only and args.fmt != "hf":
        raise UserError("--decoder-only is only for --format hf (a transformers assistant model)")
    export._check_output(Path(args.output).expanduser(), args.overwrite)
    export.check_writable(args.output)          # a read-only or forbidden --output, before the model is loaded
    export.needs(args.fmt)                      # torch for openai, tokenizers for hf / ctranslate2

    model = export.resolve_model(args.model)
    try:
        out = export.export_model(model, args.fmt, args.output, dtype=args.dtype, overwrite=args.overwrite,
                                  decoder_only=args.decoder_only)
    except OSError as e:                        # disk full, permissions changed meanwhile: nothing was left behind
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise UserError(f"cannot write {args.output}: {e.strerror or e}{where}") from None
    what = "WhisperForCausalLM decoder" if args.decoder_only else model.cfg.__class__.__name__
    print(f"wrote {args.fmt} ({args.dtype}) of {model.source} to {out}"
          + (f" [{what}]" if args.decoder_only else ""))
    return 0
