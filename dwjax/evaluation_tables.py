"""The results of `dwjax evaluate` as markdown: `markdown_table` (one model's sets, languages, long-form, noise,
speculative decoding and failures), printed by `dwjax evaluate`; `percent`, the figures' format, shared with
`dwjax report`."""
from __future__ import annotations

import math

MAX_LISTED_FAILURES = 20     # failures listed under the markdown table (the JSON has all)


def percent(x) -> str:
    """A rate as a percentage with two decimals; "n/a" for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def markdown_table(results: dict) -> str:
    """The results of one `evaluate` call as markdown tables."""
    head = "| set | n | WER | orth. WER | IER | SER | DER | rep. 5-grams | RTF | audio-s/s |"
    lines = [f"**{results['label']}**", "", head, "|" + "---|" * 10]
    for s in results["sets"]:
        lines.append(f"| {s['name']} | {s['n']} | {percent(s['wer'])} | {percent(s['orthographic_wer'])} | "
                     f"{percent(s['ier'])} | {percent(s['ser'])} | {percent(s['der'])} | {s['repeated_5grams']} | "
                     f"{s['rtf']:.4f} | {s['audio_s_per_s']:.1f} |")
    m = results["macro"]
    lines.append(f"| **macro** | | {percent(m['wer'])} | {percent(m['orthographic_wer'])} | {percent(m['ier'])} | "
                 f"{percent(m['ser'])} | {percent(m['der'])} | {m['repeated_5grams']} | {m['rtf']:.4f} | |")
    per_lang = [(s["name"], row) for s in results["sets"] for row in s.get("languages") or []]
    if any(row["language"] not in (None, "en") or row["task"] == "translate" or row["lid_accuracy"] is not None
           for _, row in per_lang):
        lines += ["", "| set | language | task | n | metric | error % | BLEU | LID accuracy % | LID agreement with "
                      "teacher % |", "|---|---|---|---|---|---|---|---|---|"]
        for name, row in per_lang:
            bleu = "" if row["bleu"] is None else f"{row['bleu']:.1f}"
            lines.append(f"| {name} | {row['language'] or '?'} | {row['task']} | {row['n']} | "
                         f"{row['metric'].upper()} | {percent(row['error_rate'])} | {bleu} | "
                         f"{percent(row['lid_accuracy'])} | {percent(row['lid_agreement'])} |")
    lf = [s for s in results["sets"] if "long_form" in s]
    if lf:
        lines += ["", "| set | long-form | recordings | WER | rep. 5-grams (ref) | RTF |", "|---|---|---|---|---|---|"]
        for s in lf:
            L = s["long_form"]
            lines.append(f"| {s['name']} | {L['method']} | {L['recordings']} | {percent(L['wer'])} | "
                         f"{L['repeated_5grams']} ({L['repeated_5grams_ref']}) | {L['rtf']:.4f} |")
    nz = [s for s in results["sets"] if "noise" in s]
    if nz:
        snrs = list(nz[0]["noise"]["snr"])
        lines += ["", "| set | noise | " + " | ".join(f"{x} dB" for x in snrs) + " |", "|---|---|" + "---|" * len(snrs)]
        for s in nz:
            lines.append(f"| {s['name']} | {s['noise']['kind']} | " +
                         " | ".join(percent(s["noise"]["snr"][x]["wer"]) for x in snrs) + " |")
    spec = [s for s in results["sets"] if "speculative" in s]
    if spec:
        lines += ["", "| set | α (acceptance) | draft tokens | teacher forwards | tokens / round |", "|---|---|---|---|---|"]
        for s in spec:
            st = s["speculative"]
            lines.append(f"| {s['name']} | {st['acceptance_rate']:.3f} | {st['draft_tokens']} | "
                         f"{st['teacher_forwards']} | {st['tokens_per_round']:.2f} |")
    failures = results.get("failures") or []
    if failures:
        lines += ["", f"**{len(failures)} input(s) failed and were not scored:**", ""]
        for f in failures[:MAX_LISTED_FAILURES]:
            where = f"{f['set']}/{f['id']}" if f.get("id") is not None else f["set"]
            lines.append(f"- {where}: {f['error']}")
        if len(failures) > MAX_LISTED_FAILURES:
            lines.append(f"- ... and {len(failures) - MAX_LISTED_FAILURES} more (all in the JSON's `failures`)")
    return "\n".join(lines)
