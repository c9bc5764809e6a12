"""Training on packed windows (issue 16): window audio, timestamps, previous-window prompts, bucketed label padding
and the on-disk teacher-encoder cache. Tiny random models and flite clips (tests/test_distill.py's assets); the
packed label rows are written by hand in `dwjax pseudo-label --pack`'s format (one row per window, `audio` null,
`members` JSON, `source`, timestamp tokens in window time).

  * a packed row's window audio is its members' audio at their offsets, zeros elsewhere;
  * without timestamps a packed label is its segments' texts joined by one space (tokenised again); with them the
    teacher's tokens as they are;
  * the previous-window prompt: <|startofprev|> + the previous window's (same dataset and source, the one just
    before) plain text, masked out of the loss; the first window of a source and other sources have none;
  * padding to the batch's bucket (16) gives the loss and update of padding to 32 (float32 rounding); logits only
    at the target positions (every unmasked one) give the loss and update of logits at every position;
  * `dwjax distill` with train.encoder_cache (float16; c0+2 runs on into c2+2, tests/test_run_on.py) gives the
    losses of a run without it within 2e-5 relative over 3 steps (measured on this model: 2.4e-7 with float16,
    1.6e-6 with bfloat16: the rounding of the encoder output to 11 / 8 significant bits), and a second run reuses
    the cache (nothing computed) with bitwise the same losses;
  * a cache made for another teacher, or whose audio changed, is refused: exit 1, one stderr line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.test_distill import build_assets, overrides


def _ts(tok, seconds: float) -> int:
    return tok.timestamp_begin + int(round(seconds / 0.02))


def write_packed_labels(path: Path, clips, tok, gap_s: float = 0.5) -> list[dict]:
    """Windows (c0 c1) (c2 c3) of source A, (c4) of source B, in the labeller's format; returns the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dwjax.audio import load_audio
    from dwjax.pseudo_label import SCHEMA
    groups = [("A", [0, 1]), ("A", [2, 3]), ("B", [4])]
    rows = []
    for source, members in groups:
        offset, mem, ids, texts = 0.0, [], [], []
        for k in members:
            text, p = clips[k]
            dur = len(load_audio(str(p))) / 16000
            mem.append({"id": f"c{k}", "offset_s": offset, "duration_s": dur, "audio": str(p)})
            ids += [_ts(tok, offset)] + tok.encode(" " + text) + [_ts(tok, offset + dur)]
            texts.append(text)
            offset += dur + gap_s
        rows.append(dict(id=f"c{members[0]}+{len(members)}", dataset="tiny", audio=None, duration_s=offset - gap_s,
                         text=" ".join(texts), token_ids=ids, language="en", avg_logprob=-0.2,
                         compression_ratio=1.0, no_speech_prob=0.01, timestamps="[]", reference=" ".join(texts),
                         reference_encoding_errors=False, wer=0.0, status="ok", members=json.dumps(mem),
                         source=source))
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from dwjax.weights.loading import load_model
    a = build_assets(tmp_path_factory.mktemp("packed_assets"))
    a["tok"] = load_model(str(a["teacher"])).tokenizer
    a["packed"] = a["root"] / "packed.parquet"
    a["rows"] = write_packed_labels(a["packed"], a["clips"], a["tok"])
    return a


def _packed_set(assets, path=None):
    from dwjax.data.loader import read_labelled
    s, _ = read_labelled("tiny", str(path or assets["packed"]), 10.0)
    s.set_tokenizer(assets["tok"])
    return s


def test_window_audio_is_members_at_offsets(assets):
    from dwjax.audio import load_audio
    from dwjax.data.loader import row_audio
    s = _packed_set(assets)
    i = s.ids.index("c0+2")
    a, speech = row_audio(s, i)
    c0, c1 = (load_audio(str(assets["clips"][k][1])) for k in (0, 1))
    start1 = int(round((len(c0) / 16000 + 0.5) * 16000))
    np.testing.assert_array_equal(a[: len(c0)], c0)
    assert not a[len(c0): start1].any()
    np.testing.assert_array_equal(a[start1: start1 + len(c1)], c1)
    assert len(a) == start1 + len(c1)
    assert speech == pytest.approx((len(c0) + len(c1)) / 16000)


def test_timestamps_kept_or_plain_text(assets):
    from dwjax.data.loader import LabelEncoder
    tok = assets["tok"]
    s = _packed_set(assets)
    i = s.ids.index("c0+2")
    rng = np.random.default_rng(0)
    plain_seq, n = LabelEncoder(tok, 64, 0.0).encode(s.tokens[i], "en", rng, s.plain[i])
    joined = f" {assets['clips'][0][0]} {assets['clips'][1][0]}"
    assert plain_seq == tok.sot_sequence(None, None, False) + tok.encode(joined) + [tok.eot]
    ts_seq, n = LabelEncoder(tok, 64, 1.0).encode(s.tokens[i], "en", rng, s.plain[i])
    assert ts_seq == tok.sot_sequence(None, None, True) + s.tokens[i] + [tok.eot] and n == 1


def test_previous_window_prompt_is_masked(assets):
    from dwjax.data.loader import LabelEncoder, TrainBatches
    tok = assets["tok"]
    s = _packed_set(assets)
    first, second, other = (s.ids.index(k) for k in ("c0+2", "c2+2", "c4+1"))
    assert s.prev[second] == first and s.prev[first] == -1 and s.prev[other] == -1
    enc = LabelEncoder(tok, 128, 0.0, prev_context_probability=1.0)
    batches = TrainBatches([s], enc, 3, seed=0, workers=1, label_bucket=16)
    try:
        out = batches.labels(0, [(0, first), (0, second), (0, other)])
    finally:
        batches.close()
    prompt = [tok.sot_prev] + s.plain[first] + tok.sot_sequence(None, None, False)
    n = len(prompt)
    assert out["n_prompt"].tolist() == [2, n, 2]
    assert out["decoder_input_ids"][1, :n].tolist() == prompt
    mask = out["loss_mask"][1]
    assert not mask[: n - 1].any() and mask[n - 1] == 1.0
    # the learned targets are the window's own text and EOT, nothing of the prompt
    learned = out["labels"][1][mask == 1].tolist()
    assert learned == s.plain[second] + [tok.eot]
    assert out["labels"].shape[1] % 16 == 0


def test_bucket_padding_gives_the_loss_of_full_padding():
    import functools

    from dwjax import losses
    from dwjax import train_step as ts
    from tests.test_train_step import FAST_COMPILE, LOSS, OPTIM, TEACHER, assert_trees_close, random_params
    from dwjax.config import ModelConfig
    from dwjax.models.student import make_student
    teacher = random_params(TEACHER, 1)
    s_cfg, student = make_student(TEACHER, teacher, decoder_layers=2)
    rng = np.random.default_rng(3)
    b = 4
    seqs = rng.integers(0, TEACHER.vocab_size, (b, 33))
    prompt, lengths = rng.integers(1, 4, b), rng.integers(6, 17, b)          # every row <= 16 positions
    feats = rng.normal(size=(b, TEACHER.n_mels, 2 * TEACHER.n_audio_ctx)).astype(np.float32)
    s_model, t_model = ts.make_models(ModelConfig(), s_cfg, TEACHER)
    tx, schedule = ts.make_optimizer(OPTIM)
    step = jax.jit(functools.partial(ts.train_step, student_model=s_model, teacher_model=t_model, loss_cfg=LOSS,
                                     tx=tx, schedule=schedule), compiler_options=FAST_COMPILE)
    results = []
    for width in (16, 32):
        batch = losses.make_decoder_batch(seqs[:, : width + 1], prompt, lengths)
        batch["input_features"] = feats
        results.append(step(ts.init_train_state(student, tx, jax.random.PRNGKey(0)), teacher, batch))
    (s16, m16), (s32, m32) = results
    assert float(m16["n_tokens"]) == float(m32["n_tokens"])
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=1e-6)
    assert_trees_close(s16.params["decoder"], s32.params["decoder"], 1e-5)



def test_target_positions_cover_every_unmasked_position():
    from dwjax.data.loader import target_positions
    mask = np.zeros((3, 32), np.float32)
    mask[0, 2:30] = 1                        # 28 of 32: k rounds up to 32, no masked filler needed past 28
    mask[1, [1, 5, 6, 7]] = 1                # not contiguous (the language token, then the text)
    mask[2, 0:9] = 1                         # the row's only masked positions are after its text
    pos = target_positions(mask)
    assert pos.shape == (3, 32)
    for r in range(3):
        on = np.flatnonzero(mask[r])
        np.testing.assert_array_equal(pos[r, :len(on)], on)
        assert np.all(mask[r, pos[r, len(on):]] == 0)
    assert target_positions(mask[1:]).shape == (2, 16)          # 9 unmasked at most: two quarters of 32


def test_target_logits_give_the_loss_of_logits_everywhere():
    """Logits only at the target positions (prompt and padding skipped) give the loss and update of logits at
    every position (float32 rounding)."""
    import functools

    from dwjax import losses
    from dwjax import train_step as ts
    from dwjax.config import LossConfig, ModelConfig
    from dwjax.data.loader import target_positions
    from dwjax.models.student import make_student
    from tests.test_train_step import FAST_COMPILE, OPTIM, TEACHER, assert_trees_close, random_params
    teacher = random_params(TEACHER, 1)
    s_cfg, student = make_student(TEACHER, teacher, decoder_layers=2)
    rng = np.random.default_rng(5)
    b = 4
    seqs = rng.integers(0, TEACHER.vocab_size, (b, 33))
    prompt, lengths = rng.integers(1, 12, b), rng.integers(14, 24, b)    # long prompts, padding after 24
    feats = rng.normal(size=(b, TEACHER.n_mels, 2 * TEACHER.n_audio_ctx)).astype(np.float32)
    s_model, t_model = ts.make_models(ModelConfig(), s_cfg, TEACHER)
    tx, schedule = ts.make_optimizer(OPTIM)
    loss_cfg = LossConfig(kl_weight=0.8, ce_weight=1.0, mse_weight=0.5, temperature=2.0)
    step = jax.jit(functools.partial(ts.train_step, student_model=s_model, teacher_model=t_model, loss_cfg=loss_cfg,
                                     tx=tx, schedule=schedule), compiler_options=FAST_COMPILE)
    batch = losses.make_decoder_batch(seqs, prompt, lengths)
    batch["input_features"] = feats
    targeted = dict(batch, target_positions=target_positions(batch["loss_mask"]))
    assert targeted["target_positions"].shape[1] < 32
    (s_all, m_all), (s_t, m_t) = (step(ts.init_train_state(student, tx, jax.random.PRNGKey(0)), teacher, x)
                                  for x in (batch, targeted))
    assert float(m_all["n_tokens"]) == float(m_t["n_tokens"]) == float(batch["loss_mask"].sum())
    for key in ("loss", "kl", "ce", "mse"):
        np.testing.assert_allclose(float(m_t[key]), float(m_all[key]), rtol=1e-5)
    assert_trees_close(s_t.params["decoder"], s_all.params["decoder"], 1e-5)


# ----------------------------------------------------------------------------------------------------- cache


def _args(assets, out, extra=()):
    args = [a for a in overrides(assets, out, 3) if not a.startswith("data.train=")]
    return args + [f"data.train=[{{name: tiny, path: {assets['packed']}}}]", "data.timestamp_probability=0.5",
                   "data.prev_context_probability=0.5", "data.run_on_fraction=1.0", *extra]


def _losses(out) -> list[float]:
    records = [json.loads(line) for line in (Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    from dwjax.cli.distill import main
    root = tmp_path_factory.mktemp("cache_runs")
    cache = root / "enc-cache"
    assert main(_args(assets, root / "plain")) == 0
    assert main(_args(assets, root / "cached", [f"train.encoder_cache={cache}"])) == 0
    return {"root": root, "cache": cache, "plain": _losses(root / "plain"), "cached": _losses(root / "cached")}


def test_cache_gives_the_same_loss(assets, runs, capsys):
    from dwjax.cli.distill import main
    plain, cached = np.array(runs["plain"]), np.array(runs["cached"])
    assert len(plain) == len(cached) == 3
    rel = np.max(np.abs(plain - cached) / np.abs(plain))
    assert rel <= 2e-5, (rel, plain, cached)
    # 3 windows x 1500 x 64 x 2 bytes
    assert (runs["cache"] / "encoder.bin").stat().st_size == 3 * 1500 * 64 * 2
    capsys.readouterr()
    out = runs["root"] / "again"
    assert main(_args(assets, out, [f"train.encoder_cache={runs['cache']}"])) == 0
    assert "0 rows to compute now, 3 already there" in capsys.readouterr().out
    assert _losses(out) == runs["cached"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_lengths"] and all(n % 64 == 0 or n == 448 for n in summary["label_lengths"])
    # logits at the loss positions only: k of a step's t positions, in quarters of t
    assert {t for t, _ in summary["step_shapes"]} == set(summary["label_lengths"])
    assert all(0 < k <= t and (4 * k) % t == 0 for t, k in summary["step_shapes"])


def _one_line(capfd, argv) -> str:
    from dwjax.cli import main
    capfd.readouterr()
    rc = main(["distill", *argv])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and len(err) == 1 and err[0].startswith("dwjax distill: error: "), err
    return err[0]


def test_cache_of_another_teacher_is_refused(assets, runs, tmp_path, capfd):
    from dwjax.models.student import make_student
    from dwjax.weights.loading import load_model, save_dwjax
    from tests.test_distill import _random_params
    t = load_model(str(assets["teacher"]))
    other = tmp_path / "teacher2"
    save_dwjax(other, t.cfg, _random_params(t.cfg, 7), t.tokenizer, t.generation, {"note": "another"})
    cache = tmp_path / "cache"
    shutil.copytree(runs["cache"], cache)
    args = [a for a in _args(assets, tmp_path / "run", [f"train.encoder_cache={cache}"])
            if not a.startswith("model.teacher=")] + [f"model.teacher={other}"]
    line = _one_line(capfd, args)
    assert "another teacher" in line and "encoder_cache_rebuild" in line


def test_cache_whose_audio_changed_is_refused(assets, runs, tmp_path, capfd):
    import os
    clips = []
    for k, (text, p) in enumerate(assets["clips"]):
        q = tmp_path / Path(p).name
        shutil.copy(p, q)
        clips.append((text, q))
    labels = tmp_path / "packed.parquet"
    write_packed_labels(labels, clips, assets["tok"])
    a = dict(assets, packed=labels)
    cache = tmp_path / "cache"
    from dwjax.data.encoder_cache import open_cache
    s = _packed_set(a, labels)
    open_cache(cache, [s], "t" * 64, "float16", 1500, 64, log=lambda m: None)
    from dwjax.data.encoder_cache import teacher_fingerprint
    from dwjax.weights.loading import load_model
    t = load_model(str(assets["teacher"]))
    meta = json.loads((cache / "cache.json").read_text())
    meta["teacher"] = teacher_fingerprint(t.params["encoder"], t.cfg.n_mels, "float32")
    (cache / "cache.json").write_text(json.dumps(meta))
    st = os.stat(clips[2][1])
    os.utime(clips[2][1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    line = _one_line(capfd, _args(a, tmp_path / "run", [f"train.encoder_cache={cache}"]))
    assert "audio of 1 row(s) changed" in line and "c2+2" in line
