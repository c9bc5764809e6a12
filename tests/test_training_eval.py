"""In-training evaluation (dwjax/training_eval.py) on the tiny random teacher/student of tests/test_distill.py:

  * the teacher-forced KL(teacher || student) at T = 1 and CE per token, computed on the mesh (8 fake devices, a
    last batch padded with masked rows), equal a float64 numpy computation from the two models' logits;
  * `dwjax distill` with a validation set evaluates every N steps (WER by generation and the KL), and
    checkpoint.keep_best keeps the checkpoint of the evaluation with the lowest WER (a step that was not
    evaluated never inherits an earlier evaluation's rank).
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tests.test_distill import build_assets, run_in_process


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("training_eval_assets"))


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_teacher_forced_kl_matches_float64_numpy(assets):
    from dwjax import mesh as mesh_lib
    from dwjax.audio import N_SAMPLES, load_audio, log_mel_spectrogram, pad_or_trim
    from dwjax.config import load_config
    from dwjax.losses import make_decoder_batch
    from dwjax.models.whisper import Whisper
    from dwjax.train_step import make_sharded_train_step
    from dwjax.training_eval import TeacherForced, load_eval_sets
    from dwjax.weights.loading import load_model

    teacher, student = load_model(assets["teacher"]), load_model(assets["student"])
    cfg = load_config(overrides=[f"data.eval=[{{name: val, path: {assets['validation']}}}]", "mesh.data=-1"])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    steps = make_sharded_train_step(cfg, mesh, student.cfg, teacher.cfg)
    tok = teacher.tokenizer
    # 6 clips, global batch 8: one batch, 2 of its rows padding (masked)
    tf = TeacherForced(load_eval_sets(cfg.data.eval, None), tok, teacher.cfg.n_mels, 8, steps, 448)
    state = steps.init_state(student.params, jax.random.PRNGKey(0))
    got = tf(state.params, steps.shard_teacher(teacher.params))

    kl = ce = n = 0.0
    prompt = tok.sot_sequence(None, None, False)
    for text, path in assets["clips"]:
        seq = np.array([prompt + tok.encode(" " + text) + [tok.eot]])
        dec = make_decoder_batch(seq, [len(prompt)], [seq.shape[1]])
        mel = log_mel_spectrogram(pad_or_trim(load_audio(path), N_SAMPLES)[None], n_mels=teacher.cfg.n_mels)
        lt = _log_softmax64(Whisper(teacher.cfg).apply({"params": teacher.params}, mel, dec["decoder_input_ids"]))
        ls = _log_softmax64(Whisper(student.cfg).apply({"params": student.params}, mel, dec["decoder_input_ids"]))
        m = dec["loss_mask"][0].astype(bool)
        kl += float(np.sum(np.exp(lt[0][m]) * (lt[0][m] - ls[0][m])))
        ce += float(-np.sum(np.take_along_axis(ls[0][m], dec["labels"][0][m][:, None], -1)))
        n += float(m.sum())
    assert got["val/tokens"] == n
    np.testing.assert_allclose(got["val/kl"], kl / n, rtol=2e-4)
    np.testing.assert_allclose(got["val/ce"], ce / n, rtol=2e-5)
    assert got["val/kl"] > 0.01          # a 1-layer student of a 2-layer random teacher differs from it


def test_in_training_evaluation_and_keep_best(assets, tmp_path):
    from dwjax import checkpoint as ckpt_lib
    from dwjax.config import load_config
    out = tmp_path / "run"
    summary = run_in_process(assets, out, 4, extra=(
        f"data.eval=[{{name: val, path: {assets['validation']}}}]", "eval.every=1", "eval.max_samples=2",
        "checkpoint.keep_last=1", "checkpoint.keep_best=1", "checkpoint.async_save=false"))
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/val/student_wer" in r}
    assert sorted(evals) == [1, 2, 3, 4]
    assert all("eval/val/kl" in r and "eval/val/ce" in r for r in evals.values())
    assert "eval/val/teacher_wer" in evals[1] and "eval/val/teacher_wer" in evals[4]
    # the student trains on these very clips with their references as labels: its teacher-forced CE falls
    assert evals[4]["eval/val/ce"] < evals[1]["eval/val/ce"]
    assert summary["eval"]["val/student_wer"] == evals[4]["eval/val/student_wer"]

    cfg = load_config(overrides=[f"run.output_dir={out}", "checkpoint.keep_last=1", "checkpoint.keep_best=1"])
    ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(out)), cfg, read_only=True)
    kept = ck.all_steps()
    wers = {s: evals[s]["eval/val/student_wer"] for s in evals}
    best = min(wers.values())
    assert 4 in kept and len(kept) <= 2
    assert wers[ck.best_step()] == best
    assert all(wers[s] == best for s in kept if s != 4)


def test_greedy_wer_reuses_its_engine_and_equals_one_device(assets):
    """`GreedyWer` on a 2-device mesh with the state's FSDP-sharded student parameters: a second evaluation with
    other parameter values compiles nothing, and each evaluation's transcripts equal a single-device
    Transcriber's on the same parameters (gathered to the host)."""
    import dataclasses

    from dwjax import mesh as mesh_lib
    from dwjax.config import load_config
    from dwjax.decoding.transcribe import Transcriber
    from dwjax.text.wer import wer
    from dwjax.train_step import make_sharded_train_step
    from dwjax.training_eval import GreedyWer, load_eval_sets
    from dwjax.weights.loading import load_model

    teacher, student = load_model(assets["teacher"]), load_model(assets["student"])
    cfg = load_config(overrides=[f"data.eval=[{{name: val, path: {assets['validation']}}}]", "mesh.data=1",
                                 "mesh.fsdp=2"])
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:2])
    steps = make_sharded_train_step(cfg, mesh, student.cfg, teacher.cfg)
    sets = load_eval_sets(cfg.data.eval, 3)          # 3 clips, global batch 4: a padded batch
    first = steps.init_state(student.params, jax.random.PRNGKey(0)).params
    second = jax.tree_util.tree_map(lambda x: x * 1.05, first)
    assert any(len(x.sharding.device_set) == 2 and not x.sharding.is_fully_replicated
               for x in jax.tree_util.tree_leaves(first))
    greedy = GreedyWer(sets, {"student": student}, mesh, 4)
    refs = [e.text for e in sets[0].rows]
    traces, texts = None, []
    for params in (first, second):
        got = greedy({"student": params})
        tr = greedy.transcribers["student"]
        if traces is None:
            traces = tr.generator.compilations
            cache = tr.generator._generate._cache_size()
        assert tr.generator.compilations == traces and tr.generator._generate._cache_size() == cache
        on_mesh = tr.transcribe(sets[0].audio)
        one = Transcriber(dataclasses.replace(student, params=jax.device_get(params)), batch_size=4)
        ref = one.transcribe(sets[0].audio)
        assert [t.tokens for t in on_mesh] == [t.tokens for t in ref]
        texts.append([t.tokens for t in ref])
        assert got["val/student_wer"] == pytest.approx(100 * wer(refs, [t.text for t in ref]))
    assert texts[0] != texts[1]                      # the second evaluation decoded with the new values
    assert list(greedy.transcribers) == ["student"]
