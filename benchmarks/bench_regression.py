"""Speed regression check: the same CPU workloads timed on two versions of dwjax in one run; new/base per workload.

    python benchmarks/bench_regression.py --base HEAD~3                    # HEAD~3 vs this tree (edits included)
    python benchmarks/bench_regression.py --base main --new bench --repeats 3
    python benchmarks/bench_regression.py --base v1 --new /path/to/another/worktree --json out.json

The base rev (and --new when it is a rev, not a directory) is checked out into a temporary `git worktree add
--detach`, removed afterwards. Every timed run is a fresh subprocess of this venv's python with PYTHONPATH=<tree>
(and the working directory outside both trees), so the package under test is the only thing that differs. Runs
are interleaved, base and new in turn (ABBA over repeats: base-new, new-base, ...), to cancel the machine's drift;
each side's number is the median of its runs, and each repeat's back-to-back pair also gives a ratio, whose median
is printed beside the ratio of the medians (it cancels drift slower than one pair). Workloads
(builtin:whisper-tiny.en, greedy, float32; the clips are made once with `dwjax make-demo-data` of the new tree and
shared by both sides):

  transcribe    --transcribe-clips clips in one batch through `dwjax.decoding.transcribe.Transcriber` (this
                script's own child code, the same on both sides): after one warm-up call, the best of
                --transcribe-calls (5) calls.
  pseudo-label  `dwjax pseudo-label` on --clips clips (--batch-size 8): its summary.json `run.wall_s`, the
                labelling loop alone (teacher loading and process start-up excluded; reading the audio included).
                Each side labels the clips once untimed first, which fills its persistent XLA compilation cache
                (JAX_COMPILATION_CACHE_DIR, one per side) so the timed runs measure labelling, not compiling;
                those labels also train the train-step workload.
  train step    `dwjax distill` for --train-steps steps at --train-batch examples, log_every 1: the median of
                metrics.jsonl's `train/step_time_s` (the loop's wall per optimizer step: batch assembly, log-mel,
                the jitted step), leaving out the first two steps and any step that met a new label bucket (a
                compile).

The student comes from each side's own `dwjax init-student` (2 decoder layers). Each workload also checks that
both sides did the same work (same transcripts, same labels, same loss tokens and first loss); a difference is
reported in the `same work` column, since a speed ratio of different work means little. Physical limits (the
encoder-bound audio-s/s, the train step's FLOPs) come from dwjax/flops.py of this script's tree at
DWJAX_PEAK_FLOPS (default 140 GFLOP/s, the project's reference CPU). JAX_PLATFORMS defaults to cpu.
Prints a table and writes JSON (default benchmarks/results/regression-<base>-vs-<new>.json). Asserts nothing;
--tolerance (5 %) only labels each row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _progress import echo, progress, tick

REPO = Path(__file__).resolve().parent.parent
MODEL = "builtin:whisper-tiny.en"
WORKLOADS = ("transcribe", "pseudo-label", "train step")


def fail(msg: str) -> SystemExit:
    """The one-line error this script exits with (status 1)."""
    return SystemExit(f"bench_regression: {msg}")


# ------------------------------------------------------------------------------------------ trees


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise fail(f"git {' '.join(args)} failed: {last}")
    return proc.stdout.strip()


def resolve_commit(rev: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if proc.returncode != 0:
        raise fail(f"{rev!r} is not a commit of the repository at {REPO}")
    return proc.stdout.strip()


def describe(tree: Path) -> str:
    """Short commit of a tree, '+edits' when it has uncommitted changes to tracked files."""
    sha = git(tree, "rev-parse", "--short", "HEAD")
    return sha + ("+edits" if git(tree, "status", "--porcelain", "--untracked-files=no") else "")


class Trees:
    """The two trees under test: git worktrees checked out here for revs (removed on exit), directories as given."""

    def __init__(self, work: Path):
        self.work, self.added = work, []

    def checkout(self, rev: str, name: str) -> tuple[Path, str]:
        sha = resolve_commit(rev)
        path = self.work / f"tree-{name}"
        git(REPO, "worktree", "add", "--detach", "--quiet", str(path), sha)
        self.added.append(path)
        return path, sha[:7]

    def tree(self, spec: str | None, name: str) -> tuple[Path, str]:
        if spec is None:
            return REPO, describe(REPO)
        if os.path.isdir(spec):
            path = Path(spec).resolve()
            if not (path / "dwjax" / "__init__.py").is_file():
                raise fail(f"--{name} {spec}: not a dwjax source tree (no dwjax/__init__.py)")
            return path, describe(path)
        return self.checkout(spec, name)

    def remove(self) -> None:
        for path in self.added:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------ runs (subprocesses)


class Side:
    """One version under test: its tree, its scratch directory and XLA cache, and the environment of its runs."""

    def __init__(self, name: str, tree: Path, label: str, work: Path):
        self.name, self.tree, self.label = name, tree, label
        self.work = work / name
        self.work.mkdir(parents=True)
        self.env = dict(os.environ, PYTHONPATH=str(tree), JAX_COMPILATION_CACHE_DIR=str(self.work / "xla_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TQDM_DISABLE="1")
        self.env.setdefault("JAX_PLATFORMS", "cpu")
        self.runs = 0

    def run(self, what: str, args: list[str]) -> float:
        """Runs `python ARGS` in this side's scratch directory (outside both trees, so `-m dwjax` is this side's);
        returns its wall seconds. Output goes to a log file, whose tail is shown when the run fails."""
        self.runs += 1
        log = self.work / f"{self.runs:02d}-{what.replace(' ', '-')}.log"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, *args], cwd=self.work, env=self.env, stdout=f,
                                  stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            raise fail(f"{what} on {self.name} ({self.label}) failed with exit {proc.returncode}; "
                             f"the end of its log is above")
        return wall

    def dwjax(self, what: str, *args: str) -> float:
        return self.run(what, ["-m", "dwjax", *args])


def make_clips(side: Side, work: Path, n: int) -> tuple[Path, list[dict]]:
    """`dwjax make-demo-data` (synthetic speech, deterministic) once; a manifest of the first n clips, absolute paths."""
    hours = n * 4.5 / 3600              # demo clips average ~3.7 s
    side.dwjax("make-demo-data", "make-demo-data", "--output", str(work / "clips"), "--hours", f"{hours:.4f}",
               "--splits", "test=1", "--seed", "1234", "--no-progress")
    rows = [json.loads(line) for line in (work / "clips" / "test.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) < n:
        raise fail(f"make-demo-data made {len(rows)} clips, fewer than the {n} asked for")
    rows = [{"id": r["id"], "audio": str((work / "clips" / r["audio"]).resolve()), "text": r["text"],
             "duration_s": r["duration_s"]} for r in rows[:n]]
    manifest = work / "clips.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, rows


def transcribe_child(manifest: Path, clips: int, calls: int, out: Path) -> None:
    """Child mode (run with PYTHONPATH=<tree>): `clips` clips in one batch through the tree's Transcriber, timed
    `calls` times after a warm-up; the best call is the run's number."""
    import dwjax
    import soundfile as sf
    from dwjax.decoding.transcribe import Transcriber

    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:clips]
    audio = []
    for r in rows:
        a, sr = sf.read(r["audio"], dtype="float32")
        if sr != 16000:
            raise RuntimeError(f"{r['audio']}: {sr} Hz, expected 16000")
        audio.append(a)
    tr = Transcriber(MODEL, batch_size=clips)
    texts = [t.text for t in tr.transcribe(audio)]                 # warm-up: compiles
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        texts = [t.text for t in tr.transcribe(audio)]
        times.append(time.perf_counter() - t0)
    out.write_text(json.dumps({"seconds": min(times), "calls_s": times, "texts": texts,
                               "audio_s": sum(len(a) for a in audio) / 16000, "package": dwjax.__file__}))


def run_transcribe(side: Side, manifest: Path, args) -> dict:
    out = side.work / f"transcribe-{side.runs + 1:02d}.json"
    side.run("transcribe", [str(Path(__file__).resolve()), "--child-transcribe", str(manifest), str(out),
                            "--transcribe-clips", str(args.transcribe_clips),
                            "--transcribe-calls", str(args.transcribe_calls)])
    r = json.loads(out.read_text())
    if not r["package"].startswith(str(side.tree)):
        raise fail(f"the transcribe child of {side.name} imported {r['package']}, not {side.tree}")
    return {"seconds": r["seconds"], "audio_s": r["audio_s"], "same": r["texts"]}


def label_texts(directory: Path) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq
    rows = []
    for part in sorted(directory.glob("labels-*.parquet")):
        t = pq.read_table(part, columns=["id", "text"])
        rows += list(zip(t.column("id").to_pylist(), t.column("text").to_pylist()))
    return sorted(rows)


def run_pseudo_label(side: Side, manifest: Path, output: Path) -> dict:
    wall = side.dwjax("pseudo-label", "pseudo-label", "--teacher", MODEL, "--data", f"bench={manifest}",
                      "--output", str(output), "--batch-size", "8", "--no-progress")
    summary = json.loads((output / "summary.json").read_text())
    run = summary.get("run") or {}
    labelled = run.get("wall_s")
    return {"seconds": labelled if labelled else wall,
            "timed": "the labelling loop (summary.json run.wall_s)" if labelled else
            "the whole process (summary.json has no run.wall_s)",
            "process_s": wall, "audio_s": summary["overall"]["audio_hours"] * 3600, "same": label_texts(output)}


def run_train(side: Side, labels: Path, output: Path, args) -> dict:
    side.dwjax("train step", "distill", f"model.teacher={MODEL}", f"model.student={side.work / 'student'}",
               f"data.train=[{{name: bench, path: {labels}}}]", "data.wer_threshold=null",
               f"run.output_dir={output}", f"optim.total_steps={args.train_steps}", "optim.warmup_steps=0",
               f"train.per_device_batch_size={args.train_batch}", "train.log_every=1",
               f"checkpoint.save_every={10 * args.train_steps}")
    metrics = output / "logs" / "metrics.jsonl"
    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "train/step_time_s" in r]
    if not steps:
        raise fail(f"{metrics} holds no train/step_time_s records")
    seen, times = set(), []
    for r in steps:                      # a step that met a new label bucket compiled: not steady state
        bucket = r.get("train/label_length")
        if r["step"] > 2 and bucket in seen:
            times.append(r["train/step_time_s"])
        seen.add(bucket)
    if not times:
        raise fail(f"{metrics}: no steady-state step (raise --train-steps)")
    first = steps[0]
    return {"seconds": statistics.median(times), "steps_timed": len(times),
            "label_length": int(max((b for b in seen if b), default=448)),
            "loss_tokens": [r.get("train/n_tokens") for r in steps],
            "same": (round(first.get("train/loss", float("nan")), 4), [r.get("train/n_tokens") for r in steps])}


# ------------------------------------------------------------------------------------------ limits


def limits(clip_s: float, label_length: int, batch: int) -> dict:
    """Physical limits from dwjax/flops.py of this script's tree (its REPO is put first on sys.path here only:
    the children import the tree under test)."""
    sys.path.insert(0, str(REPO))
    from dwjax.flops import encoder_flops, peak_flops, train_step_flops
    from dwjax.models.configs import official
    teacher = official("tiny.en")
    student = teacher.replace(decoder_layers=2)
    peak = peak_flops()
    enc = encoder_flops(teacher)
    step = train_step_flops(teacher, student, batch, label_length)[1]
    return {"peak_flops": peak, "encoder_flops": enc, "audio_s_per_s": peak / enc * clip_s,
            "train_step_flops": step, "train_step_s": step / peak}


# ------------------------------------------------------------------------------------------ parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="git rev of the version to compare against (required)")
    p.add_argument("--new", default=None, help="git rev or source tree (default: this tree, uncommitted edits too)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per workload and side")
    p.add_argument("--clips", type=int, default=16, help="clips pseudo-labelled")
    p.add_argument("--transcribe-clips", type=int, default=8, help="clips in the transcribe batch")
    p.add_argument("--transcribe-calls", type=int, default=5, help="timed calls per transcribe run (best counts)")
    p.add_argument("--train-steps", type=int, default=12, help="steps per distill run (the first two untimed)")
    p.add_argument("--train-batch", type=int, default=4, help="train.per_device_batch_size")
    p.add_argument("--tolerance", type=float, default=0.05, help="new/base above 1 + this is labelled SLOWER")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/regression-BASE-vs-NEW.json")
    p.add_argument("--child-transcribe", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.base is None and not args.child_transcribe:
        p.error("--base is required")
    if args.repeats < 1 or args.train_steps < 3 or args.transcribe_clips < 1 or args.transcribe_calls < 1:
        p.error("--repeats >= 1, --train-steps >= 3, --transcribe-clips >= 1 and --transcribe-calls >= 1")
    if args.transcribe_clips > args.clips and not args.child_transcribe:
        p.error("--transcribe-clips must be <= --clips (they are the first clips of the set)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_transcribe:
        transcribe_child(args.child_transcribe[0], args.transcribe_clips, args.transcribe_calls,
                         args.child_transcribe[1])
        return 0
    resolve_commit(args.base)                              # a wrong rev fails before any work
    if args.new is not None and not os.path.isdir(args.new):
        resolve_commit(args.new)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dwjax-regression-") as tmp:
        work = Path(tmp)
        trees = Trees(work)
        try:
            base_tree, base_label = trees.tree(args.base, "base")
            new_tree, new_label = trees.tree(args.new, "new")
            base, new = Side("base", base_tree, base_label, work), Side("new", new_tree, new_label, work)
            load_before = os.getloadavg()[0]
            results = measure(base, new, work, args)
        finally:
            trees.remove()
    report(results, base, new, args, time.time() - started, (load_before, os.getloadavg()[0]))
    return 0


def measure(base: Side, new: Side, work: Path, args) -> dict:
    sides = (base, new)
    bar = progress(2 * (2 + 3 * args.repeats) + 1, "bench_regression", unit="run")
    manifest, rows = make_clips(new, work, args.clips)
    tick(bar, 1, "clips made")
    first = work / "transcribe-clips.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.transcribe_clips]))
    for side in sides:                  # untimed: the student, and labels that also fill the compilation cache
        side.dwjax("init-student", "init-student", "--teacher", MODEL, "--decoder-layers", "2",
                   "--output", str(side.work / "student"))
        tick(bar, 1, f"{side.name}: student made")
        run_pseudo_label(side, manifest, side.work / "labels")
        tick(bar, 1, f"{side.name}: labelled once (compile cache filled)")
    runs = {w: {"base": [], "new": []} for w in WORKLOADS}
    for r in range(args.repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        for w in WORKLOADS:
            for side in order:
                out = side.work / f"{w.replace(' ', '-')}-r{r}"
                if w == "transcribe":
                    res = run_transcribe(side, first, args)
                elif w == "pseudo-label":
                    res = run_pseudo_label(side, manifest, out)
                else:
                    res = run_train(side, side.work / "labels", out, args)
                runs[w][side.name].append(res)
                tick(bar, 1, f"{w} {side.name}: {res['seconds']:.2f} s")
    bar.close()
    return runs


def summarise(runs: dict, args) -> dict:
    out = {}
    for w, by_side in runs.items():
        med = {s: statistics.median(r["seconds"] for r in rs) for s, rs in by_side.items()}
        same = all(r["same"] == by_side["base"][0]["same"] for rs in by_side.values() for r in rs)
        ratio = med["new"] / med["base"]
        pairs = [n["seconds"] / b["seconds"] for b, n in zip(by_side["base"], by_side["new"])]
        verdict = "ok" if abs(ratio - 1) <= args.tolerance else ("SLOWER" if ratio > 1 else "faster")
        out[w] = {"base_s": med["base"], "new_s": med["new"], "ratio": ratio,
                  "pair_ratios": pairs, "pair_ratio_median": statistics.median(pairs), "verdict": verdict, "same_work": same,
                  "runs": {s: [{k: v for k, v in r.items() if k != "same"} for r in rs] for s, rs in by_side.items()}}
    return out


def report(runs: dict, base: Side, new: Side, args, wall: float, load: tuple[float, float]) -> None:
    rows = summarise(runs, args)
    tr = runs["transcribe"]["base"][0]
    pl = runs["pseudo-label"]["base"][0]
    train = runs["train step"]["base"][0]
    lim = limits(tr["audio_s"] / args.transcribe_clips, train["label_length"], args.train_batch)
    rate = {"transcribe": lambda s: f"{tr['audio_s'] / s:.2f} audio-s/s",
            "pseudo-label": lambda s: f"{pl['audio_s'] / s:.2f} audio-s/s",
            "train step": lambda s: f"{1 / s:.3f} steps/s, {args.train_batch / s:.2f} samples/s"}
    echo(f"\nbase {base.label} ({base.tree})  vs  new {new.label} ({new.tree}); {args.repeats} run(s) per side, "
         f"interleaved base/new (ABBA), median per side; {os.cpu_count()} CPUs, load average {load[0]:.2f} before, "
         f"{load[1]:.2f} after (other work on the machine makes the ratios noisy); {wall / 60:.1f} min in all")
    echo(f"transcribe:   {args.transcribe_clips} clips ({tr['audio_s']:.1f} audio-s), one Transcriber batch, greedy; "
         f"best of {args.transcribe_calls} calls after a warm-up")
    echo(f"pseudo-label: {args.clips} clips ({pl['audio_s']:.1f} audio-s), `dwjax pseudo-label --batch-size 8`; "
         f"{pl['timed']}, compile cache warm")
    echo(f"train step:   `dwjax distill`, batch {args.train_batch} x {train['label_length']} label positions, "
         f"median train/step_time_s of {train['steps_timed']} steady steps of {args.train_steps}")
    echo(f"limits at {lim['peak_flops'] / 1e9:.0f} GFLOP/s (dwjax/flops.py): encoder-bound "
         f"{lim['audio_s_per_s']:.2f} audio-s/s ({lim['encoder_flops'] / 1e9:.1f} GFLOP per 30 s window, "
         f"{tr['audio_s'] / args.transcribe_clips:.1f} s clips); train step >= {lim['train_step_s']:.3f} s "
         f"({lim['train_step_flops'] / 1e9:.0f} GFLOP/step)\n")
    echo("| workload | base s | new s | new/base | median of paired new/base | base rate | new rate | same work "
         "| verdict |")
    echo("|---|---|---|---|---|---|---|---|---|")
    for w, r in rows.items():
        echo(f"| {w} | {r['base_s']:.3f} | {r['new_s']:.3f} | {r['ratio']:.3f} | {r['pair_ratio_median']:.3f} "
             f"| {rate[w](r['base_s'])} | "
             f"{rate[w](r['new_s'])} | {'yes' if r['same_work'] else 'NO'} | {r['verdict']} |")
    echo(f"verdict: new/base within 1 +- {args.tolerance:.0%} is ok; per-run times are in the JSON")
    path = args.json or REPO / "benchmarks" / "results" / f"regression-{base.label}-vs-{new.label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "base": {"label": base.label, "tree": str(base.tree)}, "new": {"label": new.label, "tree": str(new.tree)},
        "repeats": args.repeats, "clips": args.clips, "transcribe_clips": args.transcribe_clips,
        "train_steps": args.train_steps, "train_batch": args.train_batch, "cpus": os.cpu_count(),
        "jax_platforms": base.env["JAX_PLATFORMS"], "load_average_1min": list(load), "wall_s": wall, "limits": lim, "workloads": rows}, indent=2))
    echo(f"written {path}")


if __name__ == "__main__":
    sys.exit(main())
