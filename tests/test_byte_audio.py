"""Issue 13: distillation on a byte-audio dataset end to end. The source is a `datasets` save_to_disk directory whose
Audio column holds embedded FLAC bytes (no file paths anywhere); `dwjax pseudo-label` labels it and `dwjax distill`
trains on the labels.

  * the label rows keep each clip's encoded bytes (`audio_bytes`; `audio`, the path, is null);
  * `distill` runs a few steps, and every batch it trained on holds, for each row, the row's decoded FLAC padded to
    30 s (compared with an independent soundfile decode of the dataset's bytes; its log-mel is that of the clip, not
    of zeros): before the fix the loader read the `audio_bytes` column nobody wrote and got None;
  * --pack on the same dataset: a window's training audio is its members' decoded bytes at their offsets;
  * labels written before `audio_bytes` existed still read (path rows), and a byte row of such labels is a one-line
    UserError, not a crash.

The teacher is tiny and random (tests/test_distill.py's size) with its final norm and EOT embedding set so that it
ends every label after one or two tokens: labelling and training take seconds.
"""
from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf

from tests.test_distill import TOKENIZER_SOURCE, overrides, save_steered_teacher

SR = 16000
DURATIONS = (1.0, 1.6, 2.2, 2.9)
TEXTS = ("the cat sat on the mat", "turn left at the church", "please close the door", "we ate bread and soup")


def _waveform(i: int, seconds: float) -> np.ndarray:
    """A voiced-sounding synthetic clip: a gliding, amplitude-modulated tone plus a little noise."""
    rng = np.random.default_rng(i)
    t = np.arange(int(round(seconds * SR))) / SR
    tone = np.sin(2 * np.pi * (170 + 35 * i + 40 * t) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t))
    return (0.3 * tone + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def _flac(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, SR, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    """Independent of dwjax.audio: soundfile straight on the bytes (16 kHz mono already)."""
    a, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SR and a.ndim == 1
    return a


def _padded(a: np.ndarray) -> np.ndarray:
    out = np.zeros(30 * SR, np.float32)
    out[: len(a)] = a
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import datasets

    from dwjax.models.student import make_student
    from dwjax.weights.loading import load_model, save_dwjax

    root = tmp_path_factory.mktemp("byte_audio")
    flacs = {f"b{i}": _flac(_waveform(i, d)) for i, d in enumerate(DURATIONS)}
    # {"bytes", "path"} structs cast to an Audio column (an arrow cast: datasets 4+ needs torchcodec to *encode*
    # audio, not to store given bytes)
    ds = datasets.Dataset.from_dict({"id": list(flacs), "audio": [{"bytes": b, "path": None} for b in flacs.values()],
                                     "text": list(TEXTS), "speaker": ["s0"] * len(flacs)})
    ds = ds.cast_column("audio", datasets.Audio(sampling_rate=SR))
    assert isinstance(ds.features["audio"], datasets.Audio)
    ds.save_to_disk(str(root / "bytes_ds"))

    # EOT's embedding is 2 x ones: EOT wins wherever it is allowed, so every label is one token (two with timestamps)
    tok = load_model(TOKENIZER_SOURCE).tokenizer
    cfg, teacher, ref = save_steered_teacher(root / "teacher", {tok.eot: 2.0}, "random test teacher")
    s_cfg, s_params = make_student(cfg, teacher, decoder_layers=1)
    save_dwjax(root / "student-init", s_cfg, s_params, tok, ref.generation, {"note": "test student"})
    return {"root": root, "data": root / "bytes_ds", "flacs": flacs, "teacher": root / "teacher",
            "student": root / "student-init", "tok": tok}


def _label(assets, output: Path, **kw) -> list[dict]:
    from dwjax.pseudo_label import LabelOptions, label_datasets, read_labels
    label_datasets([f"bytes={assets['data']}"],
                   LabelOptions(teacher=str(assets["teacher"]), output=str(output), batch_size=2, max_new_tokens=64,
                                num_workers=1, progress=False, **kw), devices=jax.devices()[:1])
    return sorted(read_labels(output).to_pylist(), key=lambda r: r["id"])


@pytest.fixture(scope="module")
def labels(assets):
    out = assets["root"] / "labels"
    return {"dir": out, "rows": _label(assets, out)}


def test_source_holds_only_bytes(assets):
    from dwjax.data.manifest import read_dataset
    examples = read_dataset(f"bytes={assets['data']}")
    assert [(e.id, e.audio_path, e.audio_bytes) for e in examples] == [(k, None, b) for k, b in assets["flacs"].items()]


def test_label_rows_keep_the_bytes(assets, labels):
    rows = labels["rows"]
    assert [r["id"] for r in rows] == list(assets["flacs"])
    for r in rows:
        assert r["status"] == "ok" and r["token_ids"], r
        assert r["audio"] is None and r["audio_bytes"] == assets["flacs"][r["id"]]
        assert r["duration_s"] == pytest.approx(len(_decode(r["audio_bytes"])) / SR)


def test_distill_trains_on_the_decoded_bytes(assets, labels, tmp_path, monkeypatch):
    from dwjax.audio import log_mel_spectrogram
    from dwjax.config import load_config
    from dwjax.data.loader import TrainBatches
    from dwjax.distill import run

    seen, lock = [], threading.Lock()
    original = TrainBatches.batch

    def spy(self, step):
        out = original(self, step)
        with lock:
            seen.append((step, list(out["ids"]), np.array(out["audio"])))
        return out
    monkeypatch.setattr(TrainBatches, "batch", spy)

    steps = 3
    paths = {"teacher": assets["teacher"], "student": assets["student"], "labels": labels["dir"]}
    summary = run(load_config(overrides=overrides(paths, tmp_path / "run", steps, per_device=2,
                                                  extra=("data.wer_threshold=null",))),
                  devices=jax.devices()[:1])
    assert summary["start_step"] == 0 and summary["end_step"] == steps
    assert summary["data"]["tiny"]["kept"] == len(assets["flacs"])
    assert np.isfinite(summary["last_loss"])
    assert (tmp_path / "run" / "student" / "params.safetensors").is_file()

    trained = [s for s in seen if s[0] < steps]                  # batch s is trained on in step s + 1
    assert {s for s, _, _ in trained} == set(range(steps))
    zero_mel = np.asarray(log_mel_spectrogram(np.zeros((1, 30 * SR), np.float32), n_mels=80))[0]
    for _, ids, audio in trained:
        assert audio.shape == (2, 30 * SR)
        for row, id_ in zip(audio, ids):
            expect = _padded(_decode(assets["flacs"][id_]))
            np.testing.assert_array_equal(row, expect)
            mel = np.asarray(log_mel_spectrogram(row[None], n_mels=80))[0]
            np.testing.assert_allclose(mel, np.asarray(log_mel_spectrogram(expect[None], n_mels=80))[0], atol=1e-6)
            assert np.max(np.abs(mel - zero_mel)) > 0.5, f"{id_}: the features are those of silence"


def test_packed_windows_of_byte_audio(assets, tmp_path):
    from dwjax.data.loader import LabelEncoder, TrainBatches, read_labelled
    rows = _label(assets, tmp_path / "packed", pack=True)
    windows = [r for r in rows if r["members"]]
    assert windows and all(r["status"] == "ok" for r in windows), rows
    assert max(len(json.loads(r["members"])) for r in windows) >= 2, "nothing was packed"
    for r in windows:
        assert r["audio"] is None and r["audio_bytes"] is None
        assert r["member_audio_bytes"] == [assets["flacs"][m["id"]] for m in json.loads(r["members"])]

    s, counts = read_labelled("packed", str(tmp_path / "packed"), None, tokenizer=assets["tok"])
    assert counts["kept"] == len(windows)
    batches = TrainBatches([s], LabelEncoder(assets["tok"], 64, 0.0), len(s), seed=0, workers=1)
    try:
        out = batches.batch(0)
    finally:
        batches.close()
    for row, id_ in zip(out["audio"], out["ids"]):
        members = s.members[s.ids.index(id_)]
        expect = np.zeros(30 * SR, np.float32)
        for m in members:
            a = _decode(assets["flacs"][m["id"]])
            start = int(round(m["offset_s"] * SR))
            expect[start: start + len(a)] = a
        np.testing.assert_array_equal(row, expect)
        assert np.abs(row).max() > 0.1
    # the encoder cache's audio fingerprint of a window of byte clips hashes the bytes (it has no paths to stat)
    import dataclasses

    from dwjax.data.encoder_cache import audio_fingerprint
    prints = [audio_fingerprint(s, i) for i in range(len(s.ids))]
    assert len(set(prints)) == len(prints)
    i = next(i for i, m in enumerate(s.members) if m and len(m) >= 2)
    changed = list(s.member_bytes)
    changed[i] = [changed[i][0][:-1] + bytes([changed[i][0][-1] ^ 1])] + list(changed[i][1:])
    assert audio_fingerprint(dataclasses.replace(s, member_bytes=changed), i) != prints[i]
    assert audio_fingerprint(dataclasses.replace(s, member_bytes=list(s.member_bytes)), i) == prints[i]


def test_labels_without_the_bytes_column(assets, tmp_path):
    """Label files of older versions (no audio_bytes column): path rows read as before; a byte row of such labels
    (audio null) is a one-line UserError naming the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dwjax.data.loader import read_labelled, row_audio
    from dwjax.errors import UserError
    clip = tmp_path / "c0.flac"
    clip.write_bytes(assets["flacs"]["b0"])
    tok = assets["tok"]
    schema = pa.schema([("id", pa.string()), ("audio", pa.string()), ("token_ids", pa.list_(pa.int32())),
                        ("text", pa.string()), ("reference", pa.string()), ("wer", pa.float64()),
                        ("status", pa.string())])
    row = dict(id="p0", audio=str(clip), token_ids=tok.encode(" hello"), text="hello", reference="hello", wer=0.0,
               status="ok")
    pq.write_table(pa.Table.from_pylist([row], schema=schema), tmp_path / "old.parquet")
    s, _ = read_labelled("old", str(tmp_path / "old.parquet"), 10.0)
    a, _ = row_audio(s, 0)
    np.testing.assert_array_equal(a, _decode(assets["flacs"]["b0"]))

    pq.write_table(pa.Table.from_pylist([dict(row, id="q0", audio=None)], schema=schema), tmp_path / "bytes.parquet")
    with pytest.raises(UserError) as err:
        read_labelled("old", str(tmp_path / "bytes.parquet"), 10.0)
    msg = str(err.value)
    assert "q0" in msg and "audio_bytes" in msg and "pseudo-label" in msg and "\n" not in msg
