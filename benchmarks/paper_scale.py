"""The paper's experiment at our scale: distil builtin whisper-base (6-6) into a 6-2 student.

    python benchmarks/paper_scale.py --out runs/paper-scale [--hours 10] [--steps 20000] [--shared ../shared/data]

Stages (each resumable: rerunning skips finished work):
  1. `dwjax make-demo-data --hours H` (default 10 h) of synthesised speech (train/validation/test);
  2. ../shared/data/real/kathleen split 90/10 by a fixed hash of the clip id (train / held-out);
  3. `dwjax pseudo-label --teacher builtin:whisper-base` on demo-train and kathleen-train;
  4. `dwjax init-student --decoder-layers 2`; `dwjax distill` (WER filter 10 %, the paper's optimiser);
  5. `dwjax evaluate` teacher and student on demo-test, kathleen held-out and ../shared/data/real/dctts;
     `dwjax report` writes the table (params, relative latency, WER) and plots.
This takes many CPU hours; it is a documented benchmark, never part of the test suite.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dwjax", *args], check=True)


def split_real(shared: Path, name: str, out: Path, held_out_percent: int = 10) -> tuple[Path, Path]:
    """JSONL manifests (train, held-out) for one folder of ../shared/data/real, split by a hash of the id."""
    rows = list(csv.DictReader(open(shared / "real" / "manifest.tsv", newline="", encoding="utf-8"),
                               delimiter="\t"))
    rows = [r for r in rows if r["path"].startswith(name + "/")]
    train, held = out / f"{name}-train.jsonl", out / f"{name}-heldout.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    with open(train, "w") as ft, open(held, "w") as fh:
        for r in rows:
            rec = {"id": r["id"], "audio": str((shared / "real" / r["path"]).resolve()), "text": r["transcript"],
                   "duration_s": float(r["duration_s"])}
            bucket = int(hashlib.sha256(r["id"].encode()).hexdigest(), 16) % 100
            (fh if bucket < held_out_percent else ft).write(json.dumps(rec) + "\n")
    return train, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/paper-scale")
    ap.add_argument("--hours", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = ap.parse_args()
    out, shared, teacher = Path(args.out), Path(args.shared), "builtin:whisper-base"

    sh("make-demo-data", "--output", str(out / "demo"), "--hours", str(args.hours), "--noise")
    k_train, k_held = split_real(shared, "kathleen", out / "real")
    dctts, _ = split_real(shared, "dctts", out / "real", held_out_percent=0)
    for name, data in (("demo", out / "demo" / "train.jsonl"), ("kathleen", k_train)):
        sh("pseudo-label", "--teacher", teacher, "--data", f"{name}={data}", "--output", str(out / f"labels-{name}"))
    if not (out / "student-init" / "dwjax_config.json").exists():
        sh("init-student", "--teacher", teacher, "--decoder-layers", "2", "--output", str(out / "student-init"))
    sh("distill", f"model.teacher={teacher}", f"model.student={out / 'student-init'}",
       f"data.train=[{{name: demo, path: {out / 'labels-demo'}}}, {{name: kathleen, path: {out / 'labels-kathleen'}}}]",
       f"data.eval=[{{name: demo-validation, path: {out / 'demo' / 'validation.jsonl'}}}]",
       "data.wer_threshold=10", f"run.output_dir={out / 'distill'}", f"optim.total_steps={args.steps}",
       "optim.warmup_steps=500", "optim.learning_rate=1e-4", f"train.per_device_batch_size={args.batch}",
       "train.eval_every=2000", "train.max_eval_samples=200", "checkpoint.save_every=1000")
    sets = [f"demo-test={out / 'demo' / 'test.jsonl'}", f"kathleen-heldout={k_held}", f"dctts={dctts}"]
    for who, model in (("teacher", teacher), ("student", str(out / "distill" / "student"))):
        sh("evaluate", "--model", model, "--data", *sets, "--output", str(out / f"eval-{who}.json"))
    sh("report", str(out / "eval-teacher.json"), str(out / "eval-student.json"), "--output", str(out / "report"))


if __name__ == "__main__":
    main()
