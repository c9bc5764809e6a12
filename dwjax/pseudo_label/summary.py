"""summary.json: per-dataset and overall statistics of a label table (`summarise`) and its plain-text table
(`format_summary`)."""
from __future__ import annotations

import json
import math
import statistics
from typing import Any, Optional

import numpy as np

from dwjax.pseudo_label.rows import NO_SPEECH, RUNAWAY, _safe_language, _scored_language, _speech_seconds, status_kind
from dwjax.text.languages import normalizer, score
from dwjax.text.wer import error_rates

THRESHOLDS = (5, 10, 20, 40, 80)          # WER % thresholds reported in the summary
SUMMARY_FILE = "summary.json"
#: columns `summarise` reads (not the audio bytes)
SUMMARY_COLUMNS = ("dataset", "id", "status", "duration_s", "reference", "reference_encoding_errors", "wer", "text",
                   "members", "language", "task", "language_source")


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    return float(np.percentile(np.asarray(sorted_values, np.float64), q)) if sorted_values else float("nan")


def _group_summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    with_ref = [r for r in ok if r["reference"] is not None]
    scored = sorted(r["wer"] for r in ok if r["wer"] is not None)
    statuses: dict[str, int] = {}
    no_speech = runaway = 0
    for r in rows:
        if status_kind(r["status"]) == NO_SPEECH:
            no_speech += 1
        elif status_kind(r["status"]) == RUNAWAY:
            runaway += 1
        elif r["status"] != "ok":
            key = status_kind(r["status"])
            statuses[key] = statuses.get(key, 0) + 1
    # each pair normalised the way its language is scored (English for translations; dwjax.text.languages)
    norms = [normalizer(_safe_language(_scored_language(r.get("language"), r.get("task")))) for r in with_ref]
    corpus = error_rates([n(r["reference"]) for n, r in zip(norms, with_ref)],
                         [n(r["text"]) for n, r in zip(norms, with_ref)], normalize=False) if with_ref else None
    by_language: dict[tuple, list[dict]] = {}
    for r in ok:
        by_language.setdefault((r.get("language") or "en", r.get("task") or "transcribe"), []).append(r)
    languages = {}
    for (lang, task), group in sorted(by_language.items()):
        refd = [r for r in group if r["reference"] is not None]
        scored_as = _safe_language(_scored_language(lang, task))
        rates = score(scored_as, [r["reference"] for r in refd], [r["text"] for r in refd]) if refd else None
        languages[f"{lang}/{task}"] = {
            "ok": len(group), "metric": rates["metric"] if rates else None,
            "corpus": None if rates is None or math.isnan(rates["rate"]) else rates["rate"],
            "detected": sum(r.get("language_source") == "detected" for r in group)}
    out = {
        "rows": len(rows), "ok": len(ok), "no_speech": no_speech, "runaway": runaway,
        "failed": len(rows) - len(ok) - no_speech - runaway,
        "audio_hours": sum(_speech_seconds(r) for r in ok) / 3600,
        "windows": sum(bool(r.get("members")) for r in rows),
        "packed_clips": sum(len(json.loads(r["members"])) for r in rows if r.get("members")),
        "with_reference": len(with_ref), "empty_references": len(with_ref) - len(scored),
        "no_reference": len(ok) - len(with_ref),
        "reference_encoding_errors": sum(bool(r["reference_encoding_errors"]) for r in rows),
        "failures": dict(sorted(statuses.items())),
        "wer": None, "kept": None, "languages": languages,
    }
    if scored:
        out["wer"] = {"corpus": None if corpus is None or math.isnan(corpus["wer"]) else corpus["wer"],
                      "mean": statistics.fmean(scored), "median": statistics.median(scored),
                      **{f"p{q}": _percentile(scored, q) for q in (10, 25, 75, 90, 95)}, "max": scored[-1]}
    if with_ref:
        # kept = labelled rows whose normalised reference is non-empty and WER% <= threshold, over labelled rows
        out["kept"] = {str(t): sum(w * 100 <= t for w in scored) / len(ok) for t in THRESHOLDS}
    return out


def summarise(table, run: Optional[dict] = None, options: Optional[dict] = None) -> dict:
    """Per-dataset and overall statistics of a label table (see `read_labels`)."""
    cols = [c for c in SUMMARY_COLUMNS if c != "id"]
    rows = table.select(cols).to_pylist()
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["dataset"], []).append(r)
    ids = table.select(["dataset", "id"]).to_pylist()
    duplicates = len(ids) - len({(r["dataset"], r["id"]) for r in ids})
    return {"options": options or {}, "run": run or {}, "thresholds_percent": list(THRESHOLDS),
            "duplicates": duplicates, "overall": _group_summary(rows),
            "datasets": {name: _group_summary(group) for name, group in sorted(by.items())}}


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def format_summary(summary: dict) -> str:
    """The summary as a plain-text table (one line per dataset, then the total)."""
    run = summary.get("run") or {}
    head = (f"{'dataset':<20} {'rows':>7} {'ok':>7} {'failed':>6} {'hours':>8} {'WER%':>6} {'mean':>6} {'med':>6} "
            f"{'p90':>6} " + " ".join(f"{'<=' + str(t):>6}" for t in THRESHOLDS))
    lines = []
    if run:
        rate = run.get("audio_s_per_s")
        lines.append(f"labelled {run.get('labelled_this_run', 0)} of {run.get('rows_this_run', 0)} rows this run: "
                     f"{run.get('audio_hours_this_run', 0.0):.4f} h of audio in {run.get('wall_s', 0.0):.1f} s "
                     f"({'-' if rate is None else f'{rate:.2f}'} audio s/s) on {run.get('processes')} process(es), "
                     f"{run.get('devices')} device(s), global batch {run.get('global_batch')}")
    lines += [head, "-" * len(head)]
    groups = list(summary["datasets"].items()) + [("TOTAL", summary["overall"])]
    for name, s in groups:
        w, kept = s["wer"] or {}, s["kept"] or {}
        lines.append(f"{name[:20]:<20} {s['rows']:>7} {s['ok']:>7} {s['failed']:>6} {s['audio_hours']:>8.4f} "
                     f"{_pct(w.get('corpus')):>6} {_pct(w.get('mean')):>6} {_pct(w.get('median')):>6} "
                     f"{_pct(w.get('p90')):>6} " + " ".join(f"{_pct(kept.get(str(t))):>6}" for t in THRESHOLDS))
    o = summary["overall"]
    lines.append(f"WER in %; '<=T': fraction (%) of labelled rows kept by a WER <= T% filter; "
                 f"{o['empty_references']} empty reference(s), {o['no_reference']} without reference, "
                 f"{o['reference_encoding_errors']} with non-UTF-8 reference text")
    if o.get("windows"):
        lines.append(f"packed: {o['packed_clips']} clips in {o['windows']} windows (one row each; 'hours' counts "
                     "clip audio, not gaps)" + (f"; {run.get('token_limit_splits', 0)} windows split at the token "
                     f"budget, {run.get('token_limit_truncated', 0)} single clips reached it" if run else ""))
    for name, s in summary["datasets"].items():
        langs = s.get("languages") or {}
        if any(not key.startswith("en/") or not key.endswith("/transcribe") for key in langs):
            lines.append(f"{name} by language/task: " + "; ".join(
                f"{key} {v['ok']} ok" + (f", {(v['metric'] or 'wer').upper()} {_pct(v['corpus'])} %"
                                         if v["corpus"] is not None else "")
                + (f" ({v['detected']} detected)" if v["detected"] else "") for key, v in langs.items()))
    if o.get("no_speech"):
        lines.append(f"no-speech rows (no label, not failures): {o['no_speech']}")
    if o.get("runaway"):
        lines.append(f"runaway rows (the teacher looped; stopped, no label, not failures): {o['runaway']}")
    if o["failures"]:
        lines.append("failed rows: " + "; ".join(f"{n} x {reason}" for reason, n in o["failures"].items()))
    if summary.get("duplicates"):
        lines.append(f"WARNING: {summary['duplicates']} duplicate (dataset, id) rows in the part files")
    return "\n".join(lines)
