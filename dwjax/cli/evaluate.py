"""dwjax evaluate --model MODEL --data DATA... : WER (short-form, long-form, noise) and speed.

    dwjax evaluate --model builtin:whisper-tiny.en --data test=data/demo/test.jsonl --output results.json
    dwjax evaluate --model builtin:whisper-base --assistant runs/student --data dev.tsv --max-samples 100
    dwjax evaluate --model runs/student --data dev.tsv --long-form chunked --noise white --snr 20,10,5,0,-5
    dwjax evaluate --config eval.yaml            # the same keys as the options (data: a list), CLI overrides
    dwjax evaluate --model runs/student --teacher builtin:whisper-base --data de=demo/de/test.jsonl fr=...

Languages: each row's manifest `language` says how it is scored (dwjax/text/languages.py: WER with the English
normaliser for English, with OpenAI's basic normaliser for other languages, CER for languages written without
spaces); a per-language table gives the error rate, BLEU (sacrebleu) for rows whose `task` is translate (their
reference is an English translation), the model's language-ID accuracy against the manifest language and, with
--teacher, its agreement with the teacher's detected language. --language detects by default; give a code to
force it for every row, or `manifest` to force each row's own.

Prints a markdown table; --output writes the full results (per file hypotheses too) as JSON for `dwjax report`.
Progress goes to stderr (a bar per pass, in audio-s/s; --no-progress hides it).

Bad inputs: each utterance whose audio cannot be used (missing, corrupt, truncated, empty, non-finite) or whose
reference is not in its language's script, the rows of each language the model cannot handle (unknown code, not
in its vocabulary, non-English for an English-only model: one line per set and language), and each
dataset that cannot be read when several are given, is named on stderr, one line each, and listed in the table
and in the JSON's `failures` (set, id, audio, error; per set `failed`); everything else is still scored and
written. Exit status: 0 when every input was scored; 1 when some input failed (the results of the good ones were
still printed and written) or nothing could be evaluated (one line on stderr says why); 2 for usage errors.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from dwjax.errors import ConfigError, UserError
from dwjax.evaluation_tables import markdown_table

KEYS = ("model", "assistant", "data", "output", "long_form", "long_form_seconds", "chunk_length", "noise", "snr",
        "batch_size", "max_samples", "dtype", "k", "seed", "language", "task", "teacher", "max_new_tokens")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwjax evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the model to evaluate (builtin:..., a directory or .pt)")
    p.add_argument("--assistant", help="a student drafting for --model (speculative decoding)")
    p.add_argument("--data", nargs="+", help="datasets: manifest / saved dataset / parquet, NAME=PATH allowed")
    p.add_argument("--config", help="YAML file with any of the options below (CLI wins)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--long-form", dest="long_form", choices=["chunked", "sequential"],
                   help="also score long-form: clips joined into ~--long-form-seconds recordings")
    p.add_argument("--long-form-seconds", dest="long_form_seconds", type=float)
    p.add_argument("--chunk-length", dest="chunk_length", type=float, help="chunk seconds (default 30 / 15)")
    p.add_argument("--noise", help="white, babble or a noise audio file")
    p.add_argument("--snr", help="comma-separated SNRs in dB (default 20,10,5,0,-5)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--max-samples", dest="max_samples", type=int, help="at most N utterances per set")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--k", type=int, help="speculative draft tokens per round (default 5)")
    p.add_argument("--seed", type=int, help="noise seed (default 0)")
    p.add_argument("--language", help="force a language (a code or name) for every row, or `manifest` to force "
                                      "each row's manifest language; default: detect")
    p.add_argument("--task", choices=["transcribe", "translate"],
                   help="task of rows without a manifest `task` (default transcribe)")
    p.add_argument("--teacher", metavar="MODEL",
                   help="a multilingual model whose detected language per clip the model's is compared with")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="hide the progress bars")
    return p


def resolve(args) -> dict:
    conf = {}
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise ConfigError(f"no such config file: {path}")
        conf = yaml.safe_load(path.read_text()) or {}
        if not isinstance(conf, dict):
            raise ConfigError(f"{path}: expected a mapping of options")
        unknown = set(conf) - set(KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(KEYS)}")
    for key in KEYS:
        v = getattr(args, key, None)
        if v is not None:
            conf[key] = v
    if not conf.get("model"):
        raise UserError("--model is required (or model: in --config)")
    if not conf.get("data"):
        raise UserError("--data is required (or data: in --config)")
    if isinstance(conf["data"], str):
        conf["data"] = [conf["data"]]
    snr = conf.get("snr", "20,10,5,0,-5")
    try:
        conf["snr"] = [float(x) for x in (snr.split(",") if isinstance(snr, str) else snr)]
    except ValueError:
        raise UserError(f"--snr must be comma-separated numbers, not {snr!r}") from None
    if conf.get("batch_size") is not None and conf["batch_size"] < 1:
        raise UserError("--batch-size must be at least 1")
    if conf.get("noise") and conf["noise"] not in ("white", "babble") and not Path(conf["noise"]).exists():
        raise UserError(f"--noise: use white, babble or an existing audio file, not {conf['noise']!r}")
    return conf


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    conf = resolve(args)
    from dwjax.evaluation import EvalOptions, evaluate  # lazy: keeps --help fast (the stage imports jax)
    opts = EvalOptions()
    for key in ("batch_size", "max_samples", "long_form", "long_form_seconds", "chunk_length", "noise", "seed",
                "max_new_tokens", "language", "task", "teacher", "k"):
        if conf.get(key) is not None:
            setattr(opts, key, conf[key])
    opts.snrs = tuple(conf["snr"])
    def on_failure(f: dict) -> None:
        where = f"{f['set']}/{f['id']}" if f.get("id") is not None else f["set"]
        print(f"dwjax evaluate: error: {where}: {f['error']}", file=sys.stderr, flush=True)

    results = evaluate(conf["model"], conf["data"], assistant=conf.get("assistant"), opts=opts,
                       dtype=conf.get("dtype") or "float32", on_failure=on_failure, progress=not args.no_progress)
    print(markdown_table(results))
    if conf.get("output"):
        out = Path(conf["output"])
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, default=float))
        except OSError as e:
            raise UserError(f"cannot write {out}: {e.strerror or e}") from None
        print(f"\nwrote {out}")
    n_failed = results.get("n_failed", 0)
    if n_failed:
        n_scored = sum(s["n"] for s in results["sets"])
        print(f"dwjax evaluate: {n_failed} input(s) failed (named above); {n_scored} scored", file=sys.stderr)
        return 1
    return 0
