"""dwjax evaluate --model MODEL --data DATA... : WER (short-form, long-form, noise) and speed.

    dwjax evaluate --model builtin:whisper-tiny.en --data test=data/demo/test.jsonl --output results.json
    dwjax evaluate --model builtin:whisper-base --assistant runs/student --data dev.tsv --max-samples 100
    dwjax evaluate --model runs/student --data dev.tsv --long-form chunked --noise white --snr 20,10,5,0,-5
    dwjax evaluate --config eval.yaml            # the same keys as the options (data: a list), CLI overrides

Prints a markdown table; --output writes the full results (per file hypotheses too) as JSON for `dwjax report`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dwjax.errors import ConfigError, UserError

KEYS = ("model", "assistant", "data", "output", "long_form", "long_form_seconds", "chunk_length", "noise", "snr",
        "batch_size", "max_samples", "dtype", "k", "seed", "language", "max_new_tokens")


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
    p.add_argument("--language")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    return p


def resolve(args) -> dict:
    conf = {}
    if args.config:
        import yaml
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
    from dwjax.evaluation import EvalOptions, evaluate, markdown_table
    opts = EvalOptions()
    for key in ("batch_size", "max_samples", "long_form", "long_form_seconds", "chunk_length", "noise", "seed",
                "max_new_tokens", "language", "k"):
        if conf.get(key) is not None:
            setattr(opts, key, conf[key])
    opts.snrs = tuple(conf["snr"])
    results = evaluate(conf["model"], conf["data"], assistant=conf.get("assistant"), opts=opts,
                       dtype=conf.get("dtype") or "float32")
    print(markdown_table(results))
    if conf.get("output"):
        out = Path(conf["output"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=float))
        print(f"\nwrote {out}")
    return 0
