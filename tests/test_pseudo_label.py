"""`dwjax pseudo-label`: labels equal the Transcriber's, WER equals jiwer's, 2 processes x 2 devices == 1 process,
kill -9 + rerun == an uninterrupted run (also with another process count), bad rows recorded with their reasons.

The runs are subprocesses with their own XLA_FLAGS (tests/multiprocess.py); they share a persistent compilation
cache so each shape compiles once per test session. Speech is synthesised with flite / espeak-ng.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf

from dwjax.pseudo_label import read_labels
from dwjax.text.normalizer import normalize_english
from tests import multiprocess
from tests.helpers import synthesize

TEACHER = "builtin:whisper-tiny.en"
NON_UTF8 = b"Caf\xe9 "          # latin-1 bytes in a UTF-8 manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A manifest of 3 speech clips (one with non-UTF-8 text, one with an empty reference) and 3 broken files."""
    root = tmp_path_factory.mktemp("pl_corpus")
    clips = synthesize(root / "speech", 3)
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really audio" * 8)
    (root / "empty.wav").write_bytes(b"")
    rows = [
        {"id": "a0", "audio": "speech/utt000.wav", "text": clips[0][0]},
        {"id": "a1", "audio": "speech/utt001.wav", "text": "@@NON_UTF8@@" + clips[1][0]},
        {"id": "a2", "audio": "speech/utt002.wav", "text": ""},
        {"id": "b_corrupt", "audio": "corrupt.wav", "text": "corrupt"},
        {"id": "b_empty", "audio": "empty.wav", "text": "empty"},
        {"id": "b_missing", "audio": "no/such/file.wav", "text": "missing"},
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode().replace(b"@@NON_UTF8@@", NON_UTF8)
    (root / "main.jsonl").write_bytes(data)
    return {"root": root, "manifest": root / "main.jsonl", "clips": clips, "cache": root / "xla_cache"}


def _label(corpus, output, processes=1, group=False, extra=()):
    argv = multiprocess.dwjax_argv("pseudo-label", "--teacher", TEACHER, "--data", f"main={corpus['manifest']}",
                                   "--output", output, "--batch-size", "1", "--commit-every", "1", "--no-progress",
                                   "--workers", "2", *extra)
    kw = dict(num_processes=processes, local_devices=2, compilation_cache=corpus["cache"],
              log_dir=Path(output).parent / f"logs-{Path(output).name}")
    if group:
        return multiprocess.start(argv, **kw)
    results = multiprocess.run(argv, timeout=300, check=False, **kw)
    # the corpus holds 3 broken files: process 0 reports them with exit 1; the other processes exit 0
    codes = [r.returncode for r in results]
    assert codes == [1] + [0] * (processes - 1), "\n".join(map(str, results))
    assert "3 of 6 rows" in results[0].output
    return results


def _rows(output) -> list[dict]:
    rows = read_labels(output).to_pylist()
    keys = [(r["dataset"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row was labelled twice"
    return sorted(rows, key=lambda r: (r["dataset"], r["id"]))


@pytest.fixture(scope="module")
def one_process(corpus):
    out = corpus["root"] / "one"
    results = _label(corpus, out)
    return {"dir": out, "rows": _rows(out), "log": results[0].output}


def test_labels_equal_transcriber_and_wer_equals_jiwer(corpus, one_process):
    from dwjax.decoding.transcribe import Transcriber
    rows = {r["id"]: r for r in one_process["rows"]}
    assert set(rows) == {"a0", "a1", "a2", "b_corrupt", "b_empty", "b_missing"}
    ref = Transcriber(TEACHER, batch_size=1, scan_layers=True).transcribe([a for _, a in corpus["clips"]])
    for i, t in enumerate(ref):
        r = rows[f"a{i}"]
        assert r["status"] == "ok"
        assert r["text"] == t.text and r["token_ids"] == t.tokens
        assert r["avg_logprob"] == pytest.approx(t.avg_logprob, abs=1e-4)
        assert r["no_speech_prob"] == pytest.approx(t.no_speech_prob, abs=1e-4)
        assert r["duration_s"] == pytest.approx(len(corpus["clips"][i][1]) / 16000)
        assert r["audio"].endswith(f"utt{i:03d}.wav") and r["language"] == "en"
    # WER: jiwer on normalised text, computed here independently
    expect = jiwer.wer(normalize_english(corpus["clips"][0][0]), normalize_english(rows["a0"]["text"]))
    assert rows["a0"]["wer"] == pytest.approx(expect, abs=1e-12)
    ref1 = (NON_UTF8.decode("utf-8", "replace") + corpus["clips"][1][0])
    assert rows["a1"]["reference"] == ref1 and rows["a1"]["reference_encoding_errors"]
    assert rows["a1"]["wer"] == pytest.approx(jiwer.wer(normalize_english(ref1), normalize_english(rows["a1"]["text"])))
    assert rows["a2"]["reference"] == "" and rows["a2"]["wer"] is None      # empty reference: no WER, counted
    # bad rows: recorded with their reasons, no label
    assert rows["b_corrupt"]["status"].startswith("unreadable audio: ")
    assert rows["b_empty"]["status"].startswith("empty audio: ")
    assert rows["b_missing"]["status"].startswith("missing audio: ") and "does not exist" in rows["b_missing"]["status"]
    for key in ("b_corrupt", "b_empty", "b_missing"):
        assert rows[key]["text"] is None and rows[key]["token_ids"] is None and rows[key]["wer"] is None
    # the summary
    summary = json.loads((one_process["dir"] / "summary.json").read_text())
    m = summary["datasets"]["main"]
    assert (m["rows"], m["ok"], m["failed"], m["empty_references"], m["reference_encoding_errors"]) == (6, 3, 3, 1, 1)
    assert m["failures"] == {"empty audio": 1, "missing audio": 1, "unreadable audio": 1}
    scored = sorted(rows[k]["wer"] for k in ("a0", "a1"))
    assert m["wer"]["median"] == pytest.approx(float(np.median(scored)))
    assert m["kept"]["80"] == pytest.approx(sum(w <= 0.8 for w in scored) / 3)
    assert summary["run"]["processes"] == 1 and summary["run"]["global_batch"] == 2
    assert "TOTAL" in one_process["log"] and "audio s/s" in one_process["log"]
    # the part files are a `datasets` parquet dataset
    import datasets
    ds = datasets.load_dataset("parquet", data_files=str(one_process["dir"] / "labels-*.parquet"), split="train",
                               cache_dir=str(one_process["dir"].parent / "hf_cache"))
    assert sorted(ds["id"]) == sorted(rows)


def test_two_processes_equal_one(corpus, one_process):
    out = corpus["root"] / "two"
    results = _label(corpus, out, processes=2)
    assert "process 1/2" in results[1].output and "process 0/2" in results[0].output
    assert {p.name[:21] for p in out.glob("labels-*.parquet")} == {"labels-00000-of-00002", "labels-00001-of-00002"}
    assert _rows(out) == one_process["rows"]


def test_kill_then_resume_equals_uninterrupted(corpus, one_process):
    out = corpus["root"] / "killed"
    group = _label(corpus, out, group=True)
    deadline = time.monotonic() + 240
    with group:
        while not list(out.glob("labels-*.parquet")):
            assert group.alive(), "the run ended before writing a part:\n" + group.output(0)
            assert time.monotonic() < deadline, "no part file appeared:\n" + group.output(0)
            time.sleep(0.02)
        group.kill()                                                   # SIGKILL
    partial = _rows(out)
    assert 0 < len(partial) < len(one_process["rows"]), "the kill came too late to test resumption"
    # resume with another process count: completed ids are read from every part
    _label(corpus, out, processes=2)
    assert _rows(out) == one_process["rows"]
    _label(corpus, out)                                               # idempotent: nothing left, nothing added
    assert _rows(out) == one_process["rows"]


def test_long_audio_and_unreadable_rows_do_not_stop_a_run(corpus, tmp_path):
    """A 3-minute file is labelled with the long-form decoder (its label scored against the texts of the clips it
    is made of); a missing file is recorded with its reason; neither stops the run."""
    from dwjax.pseudo_label import LabelOptions, label_datasets
    # the corpus clips, each followed by 2 s of silence, whole while they fit in 180 s, then silence; the reference
    # is their texts in the same order. The order is the ternary Thue-Morse word (2 1 0 2 0 1 2 1 0 1 2 0 ...):
    # square-free, no stretch of clips is followed by the same stretch. Tiled periodically (0 1 2 0 1 2 ...: a 15 s
    # period inside 30 s chunks) the chunked merge, which prefers the longest matching overlap, aligned chunks one
    # period too far and dropped 108 of 316 words (WER 0.37); a real recording does not repeat itself like that
    gap = np.zeros(16000 * 2, np.float32)
    units = [(text, np.concatenate([a, gap])) for text, a in corpus["clips"]]
    zeros = [k for k in range(400) if bin(k).count("1") % 2 == 0]         # the 0s of the Thue-Morse sequence
    order = [b - a - 1 for a, b in zip(zeros, zeros[1:])]               # how many 1s between consecutive 0s
    pieces, texts, n = [], [], 0
    for k in order:
        text, a = units[k]
        if n + len(a) > 180 * 16000:
            break
        pieces.append(a)
        texts.append(text)
        n += len(a)
    long_audio = np.concatenate(pieces + [np.zeros(180 * 16000 - n, np.float32)])
    reference = " ".join(texts)
    sf.write(tmp_path / "long.flac", long_audio, 16000)
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": "long", "audio": "long.flac", "text": reference}) + "\n"
        + json.dumps({"id": "missing", "audio": "nope.flac", "text": "y"}) + "\n", encoding="utf-8")
    import jax
    summary = label_datasets([str(tmp_path / "m.jsonl")],
                             LabelOptions(teacher=TEACHER, output=str(tmp_path / "out"), batch_size=1, progress=False),
                             devices=jax.devices()[:1])
    rows = {r["id"]: r for r in _rows(tmp_path / "out")}
    assert rows["missing"]["status"].startswith("missing audio: ")
    assert summary["overall"]["failures"] == {"missing audio": 1}
    long = rows["long"]
    assert long["status"] == "ok" and long["duration_s"] == pytest.approx(180.0)
    wer = jiwer.wer(normalize_english(reference), normalize_english(long["text"]))
    assert long["wer"] == pytest.approx(wer, abs=1e-12)
    # measured 0.045 (35 clips, 316 words: 14 substitutions, the teacher hearing "train" as "praying" / "frame" in
    # the flite clip, no deletions or insertions); 0.10 is twice that and below one dropped 3-clip stretch (0.12)
    assert wer <= 0.10, (wer, long["text"])


def test_runaway_stop_ends_looping_rows_at_their_limit(tmp_path):
    """A teacher that never ends (EOT's embedding set far below the rest, one token favoured: it repeats that token)
    on clips of 1.0-2.9 s with a budget of 64 tokens: each row stops after RUNAWAY_MARGIN + RUNAWAY_TOKENS_PER_S x
    its seconds tokens (hand-computed here from the clip lengths) and gets status "runaway: ..." without a label and
    without counting as failed; the 2.9 s clip's limit (74) is above the budget, so it stops at the budget, and its
    text (one word repeated) is a loop, so it is a runaway row too. Packed (--pack), the four clips make one window
    that reaches the budget: a loop, so it is one runaway row and is not split and decoded again."""
    import math

    import jax

    from dwjax.pseudo_label import LabelOptions, is_failure, label_datasets, status_kind
    from dwjax.pseudo_label.rows import RUNAWAY_MARGIN, RUNAWAY_TOKENS_PER_S
    from dwjax.weights.loading import load_model
    from tests.test_byte_audio import _waveform
    from tests.test_distill import TOKENIZER_SOURCE, save_steered_teacher

    tok = load_model(TOKENIZER_SOURCE).tokenizer
    looped = tok.encode(" the")[0]
    save_steered_teacher(tmp_path / "teacher", {tok.eot: -2.0, looped: 2.0}, "a teacher that never ends")
    durations = (1.0, 1.6, 2.2, 2.9)
    with open(tmp_path / "m.jsonl", "w") as f:
        for i, d in enumerate(durations):
            sf.write(tmp_path / f"c{i}.wav", _waveform(i, d), 16000)
            f.write(json.dumps({"id": f"c{i}", "audio": str(tmp_path / f"c{i}.wav"), "speaker": "s"}) + "\n")
    budget = 64

    def label(out, **kw):
        summary = label_datasets([str(tmp_path / "m.jsonl")], LabelOptions(
            teacher=str(tmp_path / "teacher"), output=str(tmp_path / out), batch_size=4, max_new_tokens=budget,
            num_workers=1, progress=False, **kw), devices=jax.devices()[:1])
        return summary, sorted(read_labels(tmp_path / out).to_pylist(), key=lambda r: r["id"])

    summary, rows = label("per-clip")
    for r, d in zip(rows, durations):
        limit = min(budget, RUNAWAY_MARGIN + math.ceil(RUNAWAY_TOKENS_PER_S * d))
        assert set(r["token_ids"] or []) <= {looped}
        assert status_kind(r["status"]) == "runaway" and not is_failure(r["status"]), r["status"]
        assert len(r["token_ids"]) == limit and f"{limit} tokens for {d:.1f} s" in r["status"]
    assert [len(r["token_ids"]) for r in rows] == [36, 48, 60, 64]
    assert summary["overall"]["runaway"] == 4 and summary["overall"]["failed"] == 0

    summary, rows = label("packed", pack=True)
    assert len(rows) == 1 and len(json.loads(rows[0]["members"])) == 4
    assert status_kind(rows[0]["status"]) == "runaway" and len(rows[0]["token_ids"]) == budget
    assert summary["overall"]["runaway"] == 1 and summary["run"]["token_limit_splits"] == 0
