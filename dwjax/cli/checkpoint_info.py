"""`dwjax checkpoint-info DIR`: list a run's checkpoints (step, metrics, size, topology, complete or not, time).

    dwjax checkpoint-info runs/default              # a run directory (its checkpoints/) or a checkpoints directory
    dwjax checkpoint-info runs/default --verify     # also check every file against the manifest (reads it all)
    dwjax checkpoint-info runs/default --json       # one JSON object per checkpoint

Reads the directory only: nothing is deleted, interrupted writes (`N.orbax-checkpoint-tmp`) are shown as INCOMPLETE.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from dwjax.checkpoint import CheckpointCorruptError, list_checkpoints, verify_step_dir
from dwjax.errors import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dwjax checkpoint-info",
                                     description="List the checkpoints of a run: step, time written, complete or "
                                                 "not, size on disk, topology and metrics.")
    parser.add_argument("directory", metavar="DIR",
                        help="run directory (holding checkpoints/) or checkpoints directory")
    parser.add_argument("--verify", action="store_true",
                        help="check sizes and CRC-32 of every file against the manifest (reads every byte)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")
    return parser


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _topology(t: dict | None) -> str:
    if not t:
        return "-"
    text = f"{t.get('process_count', '?')} proc / {t.get('device_count', '?')} dev"
    if t.get("mesh"):
        text += " mesh " + "x".join(f"{k}={v}" for k, v in t["mesh"].items())
    return text


def _metrics(m: dict | None) -> str:
    if not m:
        return "-"
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    directory = Path(args.directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    rows = list_checkpoints(directory)
    status = {}
    for s in rows:
        if not s.complete:
            status[s.path] = "INCOMPLETE"
        elif args.verify:
            try:
                status[s.path] = "verified" if verify_step_dir(s.path, full=True) else "complete (no manifest)"
            except CheckpointCorruptError as e:
                status[s.path] = f"CORRUPT: {e}"
        else:
            status[s.path] = "complete"
    if args.json:
        for s in rows:
            print(json.dumps({**dataclasses.asdict(s), "path": str(s.path), "status": status[s.path]}))
        return 0
    if not rows:
        print(f"no checkpoints in {directory}")
        return 0
    header = ("step", "written (UTC)", "status", "size", "topology", "metrics")
    table = [header] + [(str(s.step), s.time or "-", status[s.path], _size(s.size_bytes), _topology(s.topology),
                         _metrics(s.metrics)) for s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0
