"""The paper's experiment at our scale, on packed 30 s windows of real and synthetic speech.

    python benchmarks/paper_scale.py --out runs/paper-scale                     # base 6-6 -> 6-2: the table (~100 min)
    python benchmarks/paper_scale.py --out runs/ablations --ablations           # tiny.en 4-4 -> 4-2 ablations
    python benchmarks/paper_scale.py --out runs/paper-scale --steps 600 --hours 0.3 --games fotaq   # smaller
    python benchmarks/paper_scale.py --out runs/ps-6-3 --decoder-layers 3 --reuse runs/paper-scale  # 6-3, same labels

Every stage is resumable: rerun the same command after an interruption; finished stages are skipped (each
writes its output last) and `dwjax distill` continues from its newest checkpoint, exactly (the data order is a
function of (seed, step)).

Training mix (what the paper calls its pseudo-labelled set, at our scale):
  * real acted speech without transcripts: the two games' voice casts (`dwjax get-game-speech`, speaker-disjoint
    90/10 split), labelled by the teacher and kept by its confidence (data.min_avg_logprob & co.);
  * real read speech with transcripts: ../shared/data/real/kathleen, 90 % of it (a fixed hash of the id), kept by
    the WER filter (10 %, applied to each packed window as a whole);
  * synthetic voices with references (`dwjax make-demo-data --noise`: noise and reverb augmentation).
Held out, never trained on: all of dctts, the other 10 % of kathleen, the held-out game characters (scored against
the teacher's own per-clip labels) and the synthetic test split, the first --eval-samples clips of each; short-form
and long-form (the same dctts and kathleen clips joined into ~180 s recordings, sequential and chunked).
Training follows the main job (run_scripts/demo.sh): windows of <= 24 s, a quarter filled only to a random length,
the token and position embeddings frozen, labels padded to multiples of 32 tokens, the encoder output cached.
Each stage's wall time goes to OUT/timings.jsonl. --reuse OTHER_OUT links an earlier run's data and labels and
copies its teacher evaluations (same teacher and data flags): only the encoder cache is filled again and the student
made, trained and scored (another --decoder-layers, --steps or --lr on the same labels).

Outputs: OUT/report/report.md (`dwjax report`: params, relative latency, WER per set, long-form), OUT/table.md
(the paper-style table: teacher, initialised student, distilled student; the in-training WER curve by step) and,
with --ablations, OUT/ablations.md (PL-only vs PL+KL, WER filter 10 vs off, half vs all data: the paper's Tables
10, 11 and 21 in miniature). A benchmark, never part of the test suite.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))     # dwjax from this checkout (for the few in-process reads)


TIMINGS: Path | None = None     # OUT/timings.jsonl: one line per stage run (command, wall seconds)


def sh(*args: str, ok_codes=(0,)) -> int:
    """Runs `python -m dwjax ARGS`; exit 1 (some inputs failed, each named, the rest done) is allowed where said.
    Each stage's wall time is appended to OUT/timings.jsonl (a resumed stage appends a second line)."""
    print("+ dwjax", " ".join(args), flush=True)
    t0 = time.time()
    rc = subprocess.run([sys.executable, "-m", "dwjax", *args]).returncode
    if TIMINGS is not None:
        with open(TIMINGS, "a") as f:
            f.write(json.dumps({"stage": args[0], "args": list(args), "wall_s": round(time.time() - t0, 1),
                                "rc": rc, "ended": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    if rc not in ok_codes:
        raise SystemExit(f"paper_scale: `dwjax {args[0]}` failed with exit status {rc}")
    return rc


def reuse_run(src: Path, out: Path) -> None:
    """Links SRC's data and labels into OUT and copies its teacher evaluations (--reuse)."""
    if not (src / "labels").is_dir():
        raise SystemExit(f"paper_scale: --reuse {src}: no labels/ there (not a paper_scale OUT?)")
    # not the encoder caches: they are tied to the audio files' sizes and times, which a new copy of ../shared changes
    for name in ("games", "real", "synthetic", "labels"):
        if (src / name).exists() and not (out / name).exists():
            (out / name).symlink_to(src / name)
    (out / "eval").mkdir(exist_ok=True)
    for f in ("teacher.json", "long-sequential-teacher.json", "long-chunked-teacher.json"):
        if (src / "eval" / f).exists() and not (out / "eval" / f).exists():
            (out / "eval" / f).write_bytes((src / "eval" / f).read_bytes())


def first_rows(manifest: Path, n: int) -> Path:
    """The first N rows of a JSONL manifest (the held-out game clips labelled per clip as their references)."""
    out = manifest.with_name(f"{manifest.stem}-first{n}.jsonl")
    if not out.exists():
        rows = manifest.read_text().splitlines()[:n]
        out.with_suffix(".tmp").write_text("".join(r + "\n" for r in rows))
        out.with_suffix(".tmp").rename(out)
    return out


def split_real(shared: Path, folder: str, out: Path, held_out_percent: int) -> tuple[Path, Path]:
    """(train, held-out) JSONL manifests of one folder of ../shared/data/real, split by a hash of the clip id."""
    train, held = out / f"{folder}-train.jsonl", out / f"{folder}-heldout.jsonl"
    if held.exists():
        return train, held
    with open(shared / "real" / "manifest.tsv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if Path(r["path"]).parts[-2] == folder]
    if not rows:
        raise SystemExit(f"paper_scale: no clips of {folder!r} in {shared / 'real' / 'manifest.tsv'}")
    out.mkdir(parents=True, exist_ok=True)
    with open(train, "w") as ft, open(held.with_suffix(".tmp"), "w") as fh:
        for r in rows:   # manifest paths are relative to ../shared/data (they start with real/)
            rec = {"id": r["id"], "audio": str((shared / r["path"]).resolve()), "text": r["transcript"],
                   "duration_s": float(r["duration_s"])}
            bucket = int(hashlib.sha256(r["id"].encode()).hexdigest(), 16) % 100
            (fh if bucket < held_out_percent else ft).write(json.dumps(rec) + "\n")
    held.with_suffix(".tmp").rename(held)
    return train, held


def teacher_references(labels: Path, manifest: Path) -> Path:
    """A manifest whose references are the teacher's per-clip labels (for speech that has no transcripts)."""
    out = labels.parent / f"{labels.name}-as-references.jsonl"
    if out.exists():
        return out
    from dwjax.pseudo_label import read_labels
    table = read_labels(labels, columns=["id", "text", "status"]).to_pylist()
    text = {r["id"]: r["text"] for r in table if r["status"] == "ok" and r["text"] and r["text"].strip()}
    with open(manifest) as f, open(out.with_suffix(".tmp"), "w") as g:
        for line in f:
            rec = json.loads(line)
            if rec["id"] in text:   # audio paths relative to the source manifest's folder made absolute
                audio = str((manifest.parent / rec["audio"]).resolve())
                g.write(json.dumps(dict(rec, audio=audio, text=text[rec["id"]])) + "\n")
    out.with_suffix(".tmp").rename(out)
    return out


def half_of(labels: Path) -> Path:
    """Every other window of a label directory (the 'half the data' ablation), same schema and files layout."""
    out = labels.parent / f"{labels.name}-half"
    done = out / "summary.json"
    if done.exists():
        return out
    out.mkdir(exist_ok=True)
    for i, part in enumerate(sorted(labels.glob("labels-*.parquet"))):
        t = pq.read_table(part)
        pq.write_table(t.take(pa.array(range(0, t.num_rows, 2))), out / part.name)
    for meta in ("labelling.json",):
        if (labels / meta).exists():
            (out / meta).write_text((labels / meta).read_text())
    done.write_text((labels / "summary.json").read_text())
    return out


def label(teacher: str, name: str, manifest: Path, out: Path, pack: bool, pack_short: float = 0.0) -> Path:
    """Packed windows (<= 24 s, PACK_SHORT of them filled only to a random length, as the main job) or per clip."""
    if not (out / "summary.json").exists():
        sh("pseudo-label", "--teacher", teacher, "--data", f"{name}={manifest}", "--output", str(out),
           *(["--pack", "--pack-short", str(pack_short)] if pack else []), ok_codes=(0, 1))
    return out


def distill(out: Path, teacher: str, student_init: Path, train_sets: list[tuple[str, Path]], cache: Path,
            extra: tuple[str, ...] = (), *, steps: int, batch: int, lr: float, curve_sets: list[tuple[str, Path]],
            eval_every: int, curve_samples: int, run_on: float) -> Path:
    """One `dwjax distill` run into OUT (resumes from its newest checkpoint); returns its final student."""
    student = out / "student"
    if (student / "dwjax_config.json").exists():
        return student
    train = ", ".join(f"{{name: {n}, path: {p}}}" for n, p in train_sets)
    evals = ", ".join(f"{{name: {n}, path: {p}}}" for n, p in curve_sets)
    sh("distill", f"model.teacher={teacher}", f"model.student={student_init}", f"data.train=[{train}]",
       f"data.eval=[{evals}]", f"run.output_dir={out}", f"optim.total_steps={steps}",
       f"optim.warmup_steps={max(1, steps // 20)}", f"optim.learning_rate={lr}",
       f"train.per_device_batch_size={batch}", f"eval.every={eval_every}",
       f"eval.max_samples={curve_samples}", "train.log_every=10", f"checkpoint.save_every={eval_every}",
       f"train.encoder_cache={cache}", "data.timestamp_probability=0.5", "data.prev_context_probability=0.2",
       f"data.run_on_fraction={run_on}", "data.label_bucket=32", "optim.frozen=[embed_tokens, embed_positions]",
       *extra)
    return student


def evaluate(model: str, sets: list[str], out: Path, max_samples: int, long_form: str | None = None) -> Path:
    """`dwjax evaluate` on the first MAX_SAMPLES clips of each set; long-form joins those clips into ~180 s
    recordings (0.5 s pauses), the same clips as short-form."""
    if not out.exists():
        sh("evaluate", "--model", model, "--data", *sets, "--output", str(out), "--max-samples", str(max_samples),
           *(["--long-form", long_form] if long_form else []), ok_codes=(0, 1))
    return out


def curve(run: Path) -> list[dict]:
    """The in-training evaluations of a distill run: [{step, set: (student WER, teacher WER)}]."""
    path = run / "logs" / "metrics.jsonl"
    rows, teacher = [], {}
    for line in path.read_text().splitlines() if path.exists() else []:
        m = json.loads(line)
        keys = [k for k in m if k.startswith("eval/") and k.endswith("_wer")]
        if not keys:
            continue
        for k in keys:
            if k.endswith("/teacher_wer"):
                teacher[k.split("/")[1]] = m[k]
        rows.append({"step": m["step"], **{k.split("/")[1]: m[k] for k in keys if k.endswith("/student_wer")}})
    return [dict(r, teacher=teacher) for r in rows]


def set_result(results: Path, name: str) -> dict:
    for s in json.loads(results.read_text())["sets"]:
        if s["name"] == name:
            return s
    return {}


def scores(results: Path, name: str) -> str:
    """'corpus WER / median utterance WER / repeated 5-grams' of one set of a `dwjax evaluate` results file."""
    from dwjax.text.wer import wer
    s = set_result(results, name)
    if not s:
        return "-"
    per_file = sorted(100 * wer(f["reference"], f["hypothesis"]) for f in s.get("files", []) if f["reference"])
    median = per_file[len(per_file) // 2] if per_file else math.nan
    return f"{100 * s['wer']:.2f} / {median:.1f} / {s['repeated_5grams']}"


def count_params(model: str) -> int:
    import jax
    from dwjax.weights.loading import load_model
    return sum(x.size for x in jax.tree_util.tree_leaves(load_model(model).params))


def long_form_wer(results: Path | None, name: str) -> str:
    lf = set_result(results, name).get("long_form") if results else None
    return f"{100 * lf['wer']:.2f}" if lf else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/paper-scale")
    ap.add_argument("--ablations", action="store_true", help="tiny.en 4-4 -> 4-2: PL-only, no WER filter, half data")
    ap.add_argument("--teacher", help="default builtin:whisper-base (builtin:whisper-tiny.en with --ablations)")
    ap.add_argument("--games", default="fotaq,bass", help="voice casts to train on (get-game-speech --games)")
    ap.add_argument("--game-hours", type=float, default=2.0,
                    help="hours of the games' train split to label and train on (get-game-speech --train-hours)")
    ap.add_argument("--pack-short", type=float, default=0.25,
                    help="fraction of packed windows filled only to a random length (pseudo-label --pack-short)")
    ap.add_argument("--packages-dir", help="a folder with the games' .deb files (skips the download)")
    ap.add_argument("--decoder-layers", type=int, default=2, help="the student's decoder layers (init-student)")
    ap.add_argument("--reuse", help="an earlier OUT of the same teacher and data flags: its data, labels and "
                                    "teacher evaluations are used, not made again")
    ap.add_argument("--run-on", type=float, default=0.25,
                    help="data.run_on_fraction: packed windows that run on into the next one up to 30 s")
    ap.add_argument("--hours", type=float, default=0.2, help="hours of synthetic speech")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8, help="30 s windows per step")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-every", type=int, default=250, help="steps between in-training WER evaluations")
    ap.add_argument("--curve-samples", type=int, default=50, help="clips per set in the in-training evaluations")
    ap.add_argument("--eval-samples", type=int, default=100, help="clips per held-out set in the final evaluations")
    ap.add_argument("--init-eval-samples", type=int, default=30,
                    help="clips per set for the initialised student (it writes to the token limit on every clip)")
    ap.add_argument("--shared", default=str(HERE.parents[2] / "shared" / "data"))
    args = ap.parse_args()
    out, shared = Path(args.out).resolve(), Path(args.shared).resolve()
    teacher = args.teacher or ("builtin:whisper-tiny.en" if args.ablations else "builtin:whisper-base")
    out.mkdir(parents=True, exist_ok=True)
    global TIMINGS
    TIMINGS = out / "timings.jsonl"
    if args.reuse:
        reuse_run(Path(args.reuse).resolve(), out)

    # 1. data
    games = out / "games"
    if not (games / "heldout.jsonl").exists():
        sh("get-game-speech", "--output", str(games), "--games", args.games, "--holdout", "0.1",
           *(["--train-hours", str(args.game_hours)] if args.game_hours else []),
           *(["--packages-dir", args.packages_dir] if args.packages_dir else []), ok_codes=(0, 1))
    k_train, k_held = split_real(shared, "kathleen", out / "real", held_out_percent=10)
    _, dctts = split_real(shared, "dctts", out / "real", held_out_percent=100)
    if not (out / "synthetic" / "test.jsonl").exists():
        sh("make-demo-data", "--output", str(out / "synthetic"), "--hours", str(args.hours), "--noise")

    # 2. labels: packed windows for training, per clip for the held-out game characters (their references)
    labels = out / "labels"
    games_l = label(teacher, "games", games / "train.jsonl", labels / "games", pack=True, pack_short=args.pack_short)
    kath_l = label(teacher, "kathleen", k_train, labels / "kathleen", pack=True, pack_short=args.pack_short)
    synth_l = label(teacher, "synthetic", out / "synthetic" / "train.jsonl", labels / "synthetic", pack=True,
                    pack_short=args.pack_short)
    games_held_clips = first_rows(games / "heldout.jsonl", args.eval_samples)
    held_l = label(teacher, "games-heldout", games_held_clips, labels / "games-heldout", pack=False)
    games_held = teacher_references(held_l, games_held_clips)
    sets = [f"dctts={dctts}", f"kathleen-heldout={k_held}", f"games-heldout={games_held}",
            f"synthetic-test={out / 'synthetic' / 'test.jsonl'}"]
    curve_sets = [("dctts", dctts), ("kathleen-heldout", k_held)]

    student_init = out / "student-init"
    if not (student_init / "dwjax_config.json").exists():
        sh("init-student", "--teacher", teacher, "--decoder-layers", str(args.decoder_layers),
           "--output", str(student_init))
    all_data = [("games", games_l), ("kathleen", kath_l), ("synthetic", synth_l)]
    common = (teacher, student_init)
    train_kw = dict(steps=args.steps, batch=args.batch, lr=args.lr, curve_sets=curve_sets,
                    eval_every=args.eval_every, curve_samples=args.curve_samples, run_on=args.run_on)

    # 3. the main distillation: PL + KL on all the data, WER filter 10 %
    student = distill(out / "distill", *common, all_data, out / "cache-all", **train_kw)

    # 4. evaluation: teacher, initialised student, distilled student; short-form and long-form
    ev = out / "eval"
    ev.mkdir(exist_ok=True)
    n = args.eval_samples
    results = {"teacher": evaluate(teacher, sets, ev / "teacher.json", n),
               "student (initialised)": evaluate(str(student_init), sets, ev / "student-init.json",
                                                 args.init_eval_samples),
               "student (distilled)": evaluate(str(student), sets, ev / "student.json", n)}
    longform = {}
    for who, model in (("teacher", teacher), ("student (distilled)", str(student))):
        for mode in ("sequential", "chunked"):
            longform[(who, mode)] = evaluate(model, [f"dctts={dctts}", f"kathleen-heldout={k_held}"],
                                             ev / f"long-{mode}-{who.split()[0]}.json", n, mode)
    sh("report", *(str(p) for p in results.values()), "--output", str(out / "report"))
    points = curve(out / "distill")
    write_table(out / "table.md", f"Paper-scale distillation ({teacher} -> {args.decoder_layers} decoder layers, "
                                  f"{args.steps} steps of {args.batch})",
                results, longform, points)
    plot_curve(out / "curve.png", points, f"{teacher}: student WER by step (teacher dashed)")

    # 5. the paper's ablations in miniature, each against the main run
    if args.ablations:
        arms = {"PL + KL, WER filter 10, all data": results["student (distilled)"]}
        for name, run, data, cache, extra in (
                ("PL only (kl_weight 0, ce_weight 1)", "ablate-pl-only", all_data, "cache-all",
                 ("loss.kl_weight=0", "loss.ce_weight=1")),
                ("PL + KL, no WER filter", "ablate-no-filter", all_data, "cache-all", ("data.wer_threshold=null",)),
                ("PL + KL, half the data", "ablate-half", [(n, half_of(p)) for n, p in all_data], "cache-half", ())):
            s = distill(out / run, *common, data, out / cache, extra, **train_kw)
            arms[name] = evaluate(str(s), sets, ev / f"{run}.json", n)
        write_table(out / "ablations.md", f"Ablations ({teacher}, {args.steps} steps of {args.batch})",
                    {"teacher": results["teacher"], **arms}, {}, [])


def write_table(path: Path, title: str, results: dict, longform: dict, points: list[dict]) -> None:
    """The paper-style table: per held-out set corpus WER / median utterance WER / repeated 5-grams, params,
    relative latency (real-time factor against the teacher's), long-form sequential and chunked WER (dctts and
    kathleen)."""
    names = ["dctts", "kathleen-heldout", "games-heldout", "synthetic-test"]
    rtf0 = json.loads(results["teacher"].read_text())["macro"]["rtf"]
    lines = [f"# {title}", "", "Each set: corpus WER / median utterance WER / repeated 5-grams (runaway outputs). "
             "games-heldout is scored against the teacher's own labels (those clips have no transcripts).", "",
             "| model | params (M) | rel. latency | " + " | ".join(names) +
             " | long-form dctts sequential / chunked | long-form kathleen sequential / chunked |",
             "|---|---|---|" + "---|" * (len(names) + 2)]
    for who, res in results.items():
        r = json.loads(res.read_text())
        params = count_params(r["model"])
        rel = r["macro"]["rtf"] / rtf0 if rtf0 else math.nan
        lines.append(f"| {who} | {params / 1e6:.1f} | {rel:.2f} | "
                     + " | ".join(scores(res, n) for n in names)
                     + "".join(f" | {long_form_wer(longform.get((who, 'sequential')), s)} / "
                               f"{long_form_wer(longform.get((who, 'chunked')), s)}"
                               for s in ("dctts", "kathleen-heldout")) + " |")
    if points:
        sets = [k for k in points[0] if k not in ("step", "teacher")]
        lines += ["", "In-training WER by step (greedy, the first clips of each set), the teacher's in brackets:", "",
                  "| step | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
        for p in points:
            lines.append(f"| {p['step']} | " + " | ".join(
                f"{p.get(s, math.nan):.2f} ({p['teacher'].get(s, math.nan):.2f})" for s in sets) + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_curve(path: Path, points: list[dict], title: str) -> None:
    """OUT/curve.png: the in-training greedy WER of the student per held-out set by step, the teacher's dashed."""
    if not points:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in (k for k in points[0] if k not in ("step", "teacher")):
        line, = ax.plot([p["step"] for p in points], [p.get(name, math.nan) for p in points], marker="o",
                        label=f"student, {name}")
        if name in points[0]["teacher"]:
            ax.axhline(points[0]["teacher"][name], ls="--", color=line.get_color(), label=f"teacher, {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("WER (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
