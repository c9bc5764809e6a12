"""dwjax report RESULTS.json... --output DIR : a markdown table and plots from `dwjax evaluate` results.

    dwjax report teacher.json student.json teacher+student.json --output report/

Writes DIR/report.md (macro WER, long-form WER, RTF and latency relative to the slowest model, per-set WER),
DIR/wer_vs_latency.png (teacher, student, teacher + assistant) and, when the results hold noise runs,
DIR/wer_vs_snr.png. The latency baseline is the slowest model (relative latency 1.0) unless --baseline LABEL.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dwjax.errors import UserError
from dwjax.evaluation_tables import percent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwjax report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files written by dwjax evaluate --output")
    p.add_argument("--output", required=True, help="directory for report.md and the plots")
    p.add_argument("--baseline", help="label of the model whose latency is 1.0 (default: the slowest)")
    return p


def load(paths) -> list[dict]:
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UserError(f"no such results file: {path}")
        try:
            r = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not JSON ({e})") from None
        if not isinstance(r, dict) or "macro" not in r or "sets" not in r:
            raise UserError(f"{path}: not a dwjax evaluate results file (no 'macro'/'sets')")
        out.append(r)
    return out


def relative_latency(results: list[dict], baseline: str | None = None) -> list[float]:
    rtfs = [r["macro"]["rtf"] for r in results]
    if baseline:
        labels = [r["label"] for r in results]
        if baseline not in labels:
            raise UserError(f"--baseline {baseline!r} is none of {', '.join(labels)}")
        base = rtfs[labels.index(baseline)]
    else:
        base = max(rtfs)
    return [x / base if base else math.nan for x in rtfs]


def table(results: list[dict], rel: list[float]) -> str:
    sets = list(dict.fromkeys(s["name"] for r in results for s in r["sets"]))
    head = ["model", "kind", "dec. layers", "macro WER", "long-form WER", "IER", "rep. 5-grams", "RTF",
            "rel. latency", "speed-up"] + [f"WER {s}" for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, x in zip(results, rel):
        m = r["macro"]
        per = {s["name"]: s["wer"] for s in r["sets"]}
        row = [r["label"], r.get("kind", ""), str(r.get("decoder_layers", "")), percent(m["wer"]),
               percent(m.get("long_form_wer")), percent(m["ier"]), str(m["repeated_5grams"]), f"{m['rtf']:.4f}",
               f"{x:.2f}", f"{1 / x:.2f}x" if x else "n/a"] + [percent(per.get(s)) for s in sets]
        lines.append("| " + " | ".join(row) + " |")
    noisy = [r for r in results if "noise" in r["macro"]]
    if noisy:
        snrs = list(noisy[0]["macro"]["noise"])
        lines += ["", "| model | noise | " + " | ".join(f"{s} dB" for s in snrs) + " |",
                  "|---|---|" + "---|" * len(snrs)]
        for r in noisy:
            kind = next((s["noise"]["kind"] for s in r["sets"] if "noise" in s), "")
            lines.append(f"| {r['label']} | {kind} | " + " | ".join(percent(r["macro"]["noise"].get(s)) for s in snrs)
                         + " |")
    return "\n".join(lines)


def plots(results: list[dict], rel: list[float], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    markers = {"teacher": "o", "student": "s", "teacher+assistant": "^"}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r, x in zip(results, rel):
        kind = r.get("kind", "teacher")
        ax.scatter([x], [100 * r["macro"]["wer"]], marker=markers.get(kind, "o"), s=60, label=f"{r['label']} ({kind})")
        ax.annotate(r["label"], (x, 100 * r["macro"]["wer"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("relative latency (1.0 = baseline)")
    ax.set_ylabel("macro WER (%)")
    ax.set_title("WER vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "wer_vs_latency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    noisy = [r for r in results if "noise" in r["macro"]]
    if noisy:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in noisy:
            curve = r["macro"]["noise"]
            snrs = sorted(curve, key=float)
            kind = next((s["noise"]["kind"] for s in r["sets"] if "noise" in s), "")
            ax.plot([float(s) for s in snrs], [100 * curve[s] for s in snrs], marker="o",
                    label=f"{r['label']} ({Path(kind).name})")
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel("macro WER (%)")
        ax.set_title("WER vs SNR")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "wer_vs_snr.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    results = load(args.results)
    rel = relative_latency(results, args.baseline)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    text = table(results, rel)
    written = plots(results, rel, out)
    md = "# dwjax evaluation report\n\n" + text + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in written) + "\n"
    (out / "report.md").write_text(md)
    print(text)
    print(f"\nwrote {out / 'report.md'}" + "".join(f", {p}" for p in written))
    return 0
