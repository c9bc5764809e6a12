"""`dwjax distill` end to end on a tiny random teacher (d_model 64, 2 heads, 2+2 layers, the real English vocabulary
so the builtin tiny.en tokenizer works) and a 1-layer student, trained on a handful of flite clips whose pseudo-labels
are written directly as a parquet file.

  * smoke: the loss falls; metrics.jsonl, TensorBoard events, summary.json and a student model directory that the
    Transcriber loads are written; the WER filter's per-set counts are reported.
  * usable: distilled on the six clips with data.eval = the same clips, the student transcribes them (in-training
    WER at the end, and the written student's own WER, <= 20 %), where the untrained student's WER is over 100 %.
  * exact resume: N steps, stop (SIGTERM-style, in-process; and a real kill -9 of `python -m dwjax distill`), resume
    for N more == 2N uninterrupted, bitwise, with the same batches (ids) in the same order.
  * topology change: 8 devices then 2 devices == 8 devices throughout, within 1e-5.
  * multi-process: 2 processes x 2 devices, then 1 process x 4 devices == 4 devices throughout (slow).
  * a truncated latest checkpoint: a warning, the previous step is restored, the run continues.

Every run keeps the global batch at 8 (per-device batch x devices), so the data stream is the same everywhere.
Meshes are data-parallel: on this CPU backend an FSDP mesh (data 2 x fsdp 4) over 8 fake devices deadlocks in XLA's
in-process collectives for this model (all pool threads blocked in rendezvous; killed after 40 s), see the report.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import multiprocess

TOKENIZER_SOURCE = "builtin:whisper-tiny.en"
SENTENCES = ("The cat sat on the mat.", "Turn left at the old church.", "Please close the door.",
             "We ate bread and soup.", "The train was late again.", "Birds fly south in winter.")
GLOBAL_BATCH = 8


# ----------------------------------------------------------------------------------------------------- assets


def _random_params(cfg, seed):
    import flax.linen as nn
    from dwjax.models.whisper import abstract_params
    rng = np.random.default_rng(seed)

    def one(path, x):
        scale = str(getattr(path[-1], "key", "")) == "scale"
        return (scale + rng.normal(0, 0.05, x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, nn.unbox(abstract_params(cfg)))


def tiny_teacher_config():
    """The tests' tiny random teacher: Whisper's real shapes for audio and text, d_model 64, 2 + 2 layers."""
    from dwjax.models.configs import WhisperConfig
    return WhisperConfig(n_mels=80, n_audio_ctx=1500, n_text_ctx=448, d_model=64, encoder_layers=2, decoder_layers=2,
                         encoder_heads=2, decoder_heads=2, ffn_dim=128, vocab_size=51864)


def save_steered_teacher(path: Path, embeddings: dict[int, float], note: str):
    """A tiny random teacher whose greedy choice is steered: its decoder output is ~ ones (final norm scale 0.1,
    bias 1), so the token whose embedding row is set to the largest value in `embeddings` ({token id: value of
    every element}) wins wherever the decoding rules allow it. Saved as a dwjax model dir; returns (cfg, params,
    the tokenizer's loaded model)."""
    from dwjax.weights.loading import load_model, save_dwjax
    ref = load_model(TOKENIZER_SOURCE)
    cfg = tiny_teacher_config()
    teacher = _random_params(cfg, 0)
    teacher["decoder"]["final_norm"]["scale"][:] = 0.1
    teacher["decoder"]["final_norm"]["bias"][:] = 1.0
    for token, value in embeddings.items():
        teacher["decoder"]["embed_tokens"]["embedding"][token] = value
    save_dwjax(path, cfg, teacher, ref.tokenizer, ref.generation, {"note": note})
    return cfg, teacher, ref


def build_assets(root: Path) -> dict:
    """Clips (16 kHz FLAC from flite), a tiny teacher and a student (dwjax model dirs), a labels parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dwjax.models.student import make_student
    from dwjax.weights.loading import load_model, save_dwjax

    root.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, text in enumerate(SENTENCES):
        wav, flac = root / f"c{i}.wav", root / f"c{i}.flac"
        subprocess.run(["flite", "-voice", "kal", "-t", text, "-o", str(wav)], check=True, timeout=60)
        subprocess.run(["sox", str(wav), "-r", "16000", "-c", "1", str(flac)], check=True, timeout=60)
        wav.unlink()
        clips.append((text, flac))

    ref = load_model(TOKENIZER_SOURCE)
    tok = ref.tokenizer
    cfg = tiny_teacher_config()
    teacher = _random_params(cfg, 0)
    save_dwjax(root / "teacher", cfg, teacher, tok, ref.generation, {"note": "random test teacher"})
    s_cfg, s_params = make_student(cfg, teacher, decoder_layers=1)
    save_dwjax(root / "student-init", s_cfg, s_params, tok, ref.generation, {"note": "test student"})

    rows = []
    for i, (text, path) in enumerate(clips):
        rows.append(dict(id=f"u{i}", audio=str(path), token_ids=tok.encode(" " + text), text=text, reference=text,
                         wer=0.0, status="ok"))
    # filtered out: WER 50 % > 10 %, one 8 % (kept), a failed row, an empty reference
    rows[4]["wer"] = 0.5
    rows[5]["wer"] = 0.08
    rows.append(dict(id="x_failed", audio=str(root / "missing.flac"), token_ids=[], text="", reference="something",
                     wer=None, status="missing audio: no such file"))
    rows.append(dict(id="x_noref", audio=str(clips[0][1]), token_ids=tok.encode(" hello"), text="hello", reference="",
                     wer=None, status="ok"))
    schema = pa.schema([("id", pa.string()), ("audio", pa.string()), ("token_ids", pa.list_(pa.int32())),
                        ("text", pa.string()), ("reference", pa.string()), ("wer", pa.float64()),
                        ("status", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "labels.parquet")
    with open(root / "validation.jsonl", "w") as f:          # the clips with their texts, for data.eval
        for i, (text, path) in enumerate(clips):
            f.write(json.dumps({"id": f"v{i}", "audio": str(path), "text": text}) + "\n")
    return {"root": root, "teacher": root / "teacher", "student": root / "student-init",
            "labels": root / "labels.parquet", "validation": root / "validation.jsonl", "clips": clips,
            "cache": root / "xla-cache"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("distill_assets"))


def overrides(assets, out, total, per_device=1, mesh=("mesh.data=-1",), extra=()) -> list[str]:
    args = [f"model.teacher={assets['teacher']}", f"model.student={assets['student']}",
            f"data.train=[{{name: tiny, path: {assets['labels']}}}]", f"run.output_dir={out}",
            f"optim.total_steps={total}", "optim.warmup_steps=0", "optim.learning_rate=0.003",
            "optim.schedule=constant", f"train.per_device_batch_size={per_device}", "train.log_every=1",
            "eval.every=0", "checkpoint.save_every=1", "checkpoint.keep_last=3", "data.num_workers=1",
            "data.timestamp_probability=0.0", *mesh]
    return args + list(extra)


# ----------------------------------------------------------------------------------------------------- helpers


def run_in_process(assets, out, total, devices=None, per_device=1, stop_at=None, monkeypatch=None, extra=()):
    """`dwjax.distill.run` here; `stop_at`: request a stop (as SIGTERM does) when step `stop_at` is reached."""
    from dwjax import checkpoint as ckpt
    from dwjax.config import load_config
    from dwjax.distill import run
    if stop_at is not None:
        original = ckpt.should_stop

        def should_stop(step=None):
            if step == stop_at:
                ckpt.request_stop()
            return original(step)
        monkeypatch.setattr(ckpt, "should_stop", should_stop)
    try:
        return run(load_config(overrides=overrides(assets, out, total, per_device, extra=extra)), devices=devices)
    finally:
        if stop_at is not None:
            monkeypatch.setattr(ckpt, "should_stop", original)
            ckpt.reset_stop()


def student_params(out) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(Path(out) / "student" / "params.safetensors"))


def batches_seen(out) -> dict[int, list[str]]:
    """{step: global batch ids} from the per-process batch logs; a step logged twice (re-run after a resume) must
    have seen the same ids both times."""
    logs = Path(out) / "logs"
    files = [logs / "batches.jsonl"] + sorted(logs.glob("batches.process*.jsonl"),
                                              key=lambda p: int(p.name[len("batches.process"):].split(".")[0]))
    per_step: dict[int, list[str]] = {}
    for f in files:
        seen: dict[int, list[str]] = {}
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] in seen:
                assert seen[rec["step"]] == rec["ids"], f"{f}: step {rec['step']} re-run on other data"
            seen[rec["step"]] = rec["ids"]
        for step, ids in seen.items():
            per_step.setdefault(step, []).extend(ids)
    return dict(sorted(per_step.items()))


def assert_params_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), f"{k}: max difference {np.max(np.abs(a[k] - b[k]))}"


def assert_params_close(a: dict, b: dict, rtol: float):
    """Relative difference of the whole tree (one vector) and of each array <= rtol."""
    assert a.keys() == b.keys()
    num = den = 0.0
    for k in a:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        num, den = num + np.sum((x - y) ** 2), den + np.sum(x ** 2)
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12)
        assert rel <= rtol, f"{k}: relative difference {rel:.2e} > {rtol}"
    assert np.sqrt(num / den) <= rtol


def expected_ids(assets, steps, seed=0) -> dict[int, list[str]]:
    """The loader's global stream: ids of batch s (trained on in step s + 1), global batch 8."""
    from dwjax.data.loader import read_labelled, row_source
    labelled, _ = read_labelled("tiny", str(assets["labels"]), 10.0)
    return {s + 1: [labelled.ids[row_source([labelled], seed, s * GLOBAL_BATCH + r)[1]] for r in range(GLOBAL_BATCH)]
            for s in range(steps)}


N = 3          # steps before the interruption; the runs are 2N long


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """2N steps on 8 devices, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = run_in_process(assets, out, 2 * N)
    return {"out": out, "summary": summary, "params": student_params(out), "batches": batches_seen(out)}


@pytest.fixture(scope="module")
def stopped(assets, tmp_path_factory):
    """A 2N-step run on 8 devices stopped (SIGTERM-style) at step N; tests copy the directory before resuming."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    mp = pytest.MonkeyPatch()
    try:
        summary = run_in_process(assets, out, 2 * N, stop_at=N, monkeypatch=mp)
    finally:
        mp.undo()
    return {"out": out, "summary": summary}


def _copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------- tests


def test_smoke_loss_falls_outputs_written_student_loads(assets, tmp_path):
    from dwjax.audio import load_audio
    from dwjax.cli.distill import main
    from dwjax.decoding.transcribe import Transcriber
    from dwjax.weights.loading import load_model
    out = tmp_path / "run"
    steps = 15
    assert main(overrides(assets, out, steps)) == 0

    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == steps and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    assert list(Path(out / "logs" / "tensorboard").glob("events.out.tfevents.*"))

    # WER filter: 8 rows; a failed one, one with WER 50 % > 10 % and one without reference and without teacher
    # scores are dropped; 8 % is kept
    counts = {"total": 8, "ok": 7, "with_reference": 6, "without_reference": 1, "kept": 5, "unfiltered": 0,
              "dropped_status": 1, "dropped_wer": 1, "dropped_no_scores": 1, "dropped_avg_logprob": 0,
              "dropped_compression_ratio": 0, "dropped_no_speech": 0, "dropped_long": 0, "run_on": 0}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == {"tiny": counts}
    assert summary["start_step"] == 0 and summary["end_step"] == steps
    assert summary["last_loss"] < summary["first_loss"]
    first = next(r for r in records if "data/tiny/kept" in r)
    assert {k: first[f"data/tiny/{k}"] for k in counts} == counts

    # the batches are the loader's stream, only kept rows
    seen = batches_seen(out)
    assert seen == expected_ids(assets, steps)
    assert {i for ids in seen.values() for i in ids} <= {"u0", "u1", "u2", "u3", "u5"}

    # the final student is a model directory the rest of dwjax uses; it moved away from its initialisation
    model = load_model(str(out / "student"))
    init = load_model(str(assets["student"]))
    assert model.cfg == init.cfg and model.metadata["distilled_steps"] == steps
    assert not np.array_equal(model.params["decoder"]["embed_tokens"]["embedding"],
                              init.params["decoder"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(model.params["encoder"]["conv1"]["kernel"], init.params["encoder"]["conv1"]["kernel"])
    result = Transcriber(model, batch_size=1).transcribe([load_audio(assets["clips"][0][1])], max_new_tokens=4)
    assert len(result) == 1 and isinstance(result[0].text, str)


#: steps, learning rate and devices (global batch 2: a step is ~4x cheaper than at 8) of the usable-student run; the
#: whole test measured 49 s on 2 busy CPU cores
USABLE_STEPS, USABLE_LR, USABLE_DEVICES = 200, 0.01, 2


def test_usable_distilled_student_wer_on_its_training_clips(assets, tmp_path):
    """The teacher is random, so CE on the labels (the references) is what teaches: distilled on the six clips
    (data.wer_threshold off, so all six train) with data.eval = the same clips, the student memorises them."""
    from dwjax.audio import load_audio
    from dwjax.decoding.transcribe import Transcriber
    from dwjax.text.wer import wer
    from dwjax.weights.loading import load_model
    refs = [text for text, _ in assets["clips"]]
    audio = [load_audio(path) for _, path in assets["clips"]]

    def student_wer(model) -> float:
        return 100 * wer(refs, [t.text for t in Transcriber(model, batch_size=len(audio)).transcribe(audio)])

    # the untrained student loops ("Carrier Carrier ... ivanivan...") to the token budget: measured 212.9 %
    untrained = student_wer(load_model(str(assets["student"])))
    assert untrained > 100, untrained
    out = tmp_path / "run"
    summary = run_in_process(assets, out, USABLE_STEPS, devices=jax.devices()[:USABLE_DEVICES], extra=(
        f"data.eval=[{{name: val, path: {assets['validation']}}}]", "data.wer_threshold=null",
        f"optim.learning_rate={USABLE_LR}", "train.log_every=20", f"checkpoint.save_every={USABLE_STEPS}"))
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval/val/student_wer" in r][-1]
    assert final["step"] == USABLE_STEPS and summary["eval"]["val/student_wer"] == final["eval/val/student_wer"]
    # measured at global batch 2, lr 0.01: WER 83.9 % at step 40, 67.7 % at 80, 16.1 % at 120, 0.0 % at 160 (CE
    # 0.11; another run, whose float noise grows apart from step 40 on, 0.0 % at 160 with CE 0.06) and 0.0 % at 200
    # (CE 0.055), the length run here: 80 steps past the first evaluation under 20 %
    assert final["eval/val/student_wer"] <= 20, final
    # the written student is that model: transcribed here, on its own
    assert student_wer(load_model(str(out / "student"))) <= 20


def test_stop_then_resume_equals_uninterrupted(assets, reference, stopped, tmp_path):
    s = stopped["summary"]
    assert s["preempted_at"] == N and s["end_step"] == N and "eval" not in s
    assert (stopped["out"] / "checkpoints" / str(N)).is_dir() and not (stopped["out"] / "student").exists()
    out = _copy_run(stopped["out"], tmp_path / "run")
    summary = run_in_process(assets, out, 2 * N)
    assert summary["start_step"] == N and summary["end_step"] == 2 * N
    assert_params_equal(student_params(out), reference["params"])
    assert batches_seen(out) == reference["batches"] == expected_ids(assets, 2 * N)


def test_kill9_then_resume_equals_uninterrupted(assets, reference, tmp_path):
    out = tmp_path / "run"
    argv = multiprocess.dwjax_argv("distill", *overrides(assets, out, 2 * N))
    env = multiprocess.process_env(0, 1, 0, local_devices=8, compilation_cache=assets["cache"])
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=multiprocess.REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while not (out / "checkpoints" / str(N)).is_dir():
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "student").exists() and not (out / "summary.json").exists(), "the run ended before the kill"
    second = subprocess.run(argv, cwd=multiprocess.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, timeout=600)
    assert second.returncode == 0, second.stdout.decode(errors="replace")[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert N <= summary["start_step"] < 2 * N and summary["end_step"] == 2 * N
    assert_params_equal(student_params(out), reference["params"])
    assert batches_seen(out) == reference["batches"]


def test_resume_on_fewer_devices(assets, reference, stopped, tmp_path):
    """First N steps on 8 devices (data 8), the rest on 2 (data 2, 4 per device): the same global batches; the
    parameters agree with the 8-device run to 1e-5 (the gradient reductions sum in another order)."""
    out = _copy_run(stopped["out"], tmp_path / "run")
    summary = run_in_process(assets, out, 2 * N, devices=jax.devices()[:2], per_device=4)
    assert summary["start_step"] == N and summary["end_step"] == 2 * N
    assert batches_seen(out) == reference["batches"]
    assert_params_close(student_params(out), reference["params"], 1e-5)


def test_corrupt_latest_checkpoint_falls_back_and_continues(assets, reference, tmp_path):
    from dwjax.checkpoint import verify_step_dir
    out = _copy_run(reference["out"], tmp_path / "run")
    import shutil
    shutil.rmtree(out / "student")
    (out / "summary.json").unlink()
    last = out / "checkpoints" / str(2 * N)
    victim = max((p for p in (last / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="falling back to the previous checkpoint"):
        summary = run_in_process(assets, out, 2 * N)
    assert summary["start_step"] == 2 * N - 1 and summary["end_step"] == 2 * N
    assert_params_equal(student_params(out), reference["params"])
    assert batches_seen(out) == reference["batches"]
    # the damaged step was set aside and written again, intact
    assert verify_step_dir(last) is True
    assert len(list((out / "checkpoints").glob(f"{2 * N}.corrupt-*"))) == 1


def test_two_processes_then_one_process_matches_single_process(assets, tmp_path):
    """2 processes x 2 devices for N steps (checkpoint at N), then 1 process x 4 devices for N more == 4 devices
    throughout, within 1e-5; the batches (both processes' rows, in process order) are the same."""
    devices = jax.devices()[:4]
    ref = tmp_path / "ref"
    run_in_process(assets, ref, 2 * N, devices=devices, per_device=2)
    out = tmp_path / "run"
    multiprocess.run(multiprocess.dwjax_argv("distill", *overrides(assets, out, N, per_device=2)), num_processes=2,
                     local_devices=2, timeout=600, compilation_cache=assets["cache"], log_dir=tmp_path / "mp-logs")
    assert (out / "checkpoints" / str(N)).is_dir() and (out / "logs" / "batches.process1.jsonl").is_file()
    summary = run_in_process(assets, out, 2 * N, devices=devices, per_device=2)
    assert summary["start_step"] == N and summary["end_step"] == 2 * N
    assert batches_seen(out) == batches_seen(ref) == expected_ids(assets, 2 * N)
    assert_params_close(student_params(out), student_params(ref), 1e-5)

