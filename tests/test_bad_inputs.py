"""Bad inputs mixed with good ones (issue 12): `evaluate`, `pseudo-label` and `transcribe` process the good inputs,
name each bad one on stderr (one line) and in their outputs, and exit 1; silence gets no pseudo-label; a WAV cut
short is rejected like a cut FLAC; progress (audio-s/s) goes to stderr, never into the stdout that tests parse.

Speech: real clips from ../shared/data/real where present, else flite / espeak-ng; the model is builtin tiny.en.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from dwjax.audio import SAMPLE_RATE, load_audio, load_audio_bytes
from dwjax.cli import main
from dwjax.errors import AudioError

MODEL = "builtin:whisper-tiny.en"


def _cut_wav(src_audio: np.ndarray, path, keep: float = 0.5) -> None:
    """A 16-bit WAV of `src_audio` whose data chunk is cut to `keep` of its bytes (the header still says all)."""
    sf.write(path, src_audio, SAMPLE_RATE, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 speech clips (FLAC) with references, a 3 s all-zero clip, a truncated WAV and a missing path."""
    from tests.helpers import real_clips, synthesize
    root = tmp_path_factory.mktemp("bad_inputs")
    clips = real_clips(3)
    if not clips:
        try:
            clips = synthesize(root / "synth", 3)
        except RuntimeError as e:          # neither ../shared nor flite / espeak-ng
            pytest.skip(f"no speech to test with: {e}")
    good = []
    for i, (text, audio) in enumerate(clips):
        sf.write(root / f"good{i}.flac", audio, SAMPLE_RATE)
        good.append({"id": f"good{i}", "audio": f"good{i}.flac", "text": text})
    sf.write(root / "silence.wav", np.zeros(3 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    _cut_wav(clips[0][1], root / "cut.wav")

    def manifest(name, rows):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    silence = {"id": "silence", "audio": "silence.wav", "text": ""}
    missing = {"id": "missing", "audio": "no/such/clip.flac", "text": "missing"}
    cut = {"id": "cut", "audio": "cut.wav", "text": clips[0][0]}
    return {"root": root, "clips": clips,
            "mixed": manifest("mixed", good + [missing]),                   # the M: 3 good + 1 missing
            "mixed_cut": manifest("mixed_cut", good[:2] + [missing, cut]),
            "with_silence": manifest("with_silence", good[:2] + [silence])}


# ---------------------------------------------------------------------------------------------- audio


def test_truncated_wav_is_rejected_like_a_cut_flac(tmp_path):
    audio = (0.1 * np.sin(np.arange(2 * SAMPLE_RATE) * 0.05)).astype(np.float32)
    for subtype, channels in (("PCM_16", 1), ("PCM_24", 2), ("FLOAT", 1)):
        x = audio if channels == 1 else np.stack([audio, audio], axis=1)
        whole = tmp_path / f"whole-{subtype}.wav"
        sf.write(whole, x, SAMPLE_RATE, subtype=subtype)
        data = whole.read_bytes()
        assert len(load_audio(whole)) == len(audio) and len(load_audio_bytes(data)) == len(audio)
        cut = tmp_path / f"cut-{subtype}.wav"
        cut.write_bytes(data[: len(data) // 2])        # libsndfile alone reads this as 1 s of audio, no error
        with pytest.raises(AudioError, match=r"cut-.*truncated"):
            load_audio(cut)
        with pytest.raises(AudioError, match="truncated"):
            load_audio_bytes(data[: len(data) // 2], name="cut")
    # a cut FLAC was already an error
    sf.write(tmp_path / "whole.flac", audio, SAMPLE_RATE)
    flac = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(flac[: len(flac) // 2])
    with pytest.raises(AudioError):
        load_audio(tmp_path / "cut.flac")
    # a streaming writer's placeholder size (unknown length) and a trailing pad byte are not truncation
    stream = bytearray(data)
    at = stream.index(b"data") + 4
    stream[at: at + 4] = (0xFFFFFFFF).to_bytes(4, "little")
    (tmp_path / "stream.wav").write_bytes(bytes(stream))
    assert len(load_audio(tmp_path / "stream.wav")) == len(audio)
    (tmp_path / "padded.wav").write_bytes(data + b"\0")
    assert len(load_audio(tmp_path / "padded.wav")) == len(audio)


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_scores_the_good_and_names_the_bad(corpus, tmp_path, capsys):
    out = tmp_path / "mixed.json"
    rc = main(["evaluate", "--model", MODEL, "--data", f"mixed={corpus['mixed']}", "--batch-size", "2",
               "--output", str(out)])
    stdout, stderr = capsys.readouterr()
    assert rc == 1
    errors = [line for line in stderr.splitlines() if line.startswith("dwjax evaluate: error:")]
    assert len(errors) == 1 and "mixed/missing" in errors[0] and "does not exist" in errors[0], stderr
    assert "Traceback" not in stderr
    assert "audio-s/s" in stderr                                       # progress, on stderr
    res = json.loads(out.read_text())
    s, = res["sets"]
    assert s["n"] == 3 and s["failed"] == 1 and [f["id"] for f in s["files"]] == ["good0", "good1", "good2"]
    assert 0.0 <= s["wer"] < 0.5 and s["audio_s_per_s"] > 0
    assert res["n_failed"] == 1
    f, = res["failures"]
    assert (f["set"], f["id"]) == ("mixed", "missing") and f["audio"].endswith("no/such/clip.flac")
    assert "| mixed | 3 |" in stdout and "mixed/missing" in stdout and f"wrote {out}" in stdout
    assert "evaluate mixed:" not in stdout and "\r" not in stdout                # no bar in stdout


def test_evaluate_truncated_wav_and_several_sets(corpus, tmp_path, capsys):
    """A truncated WAV fails like a missing file; an unreadable second dataset does not stop the first."""
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--model", MODEL, "--data", f"a={corpus['mixed_cut']}", f"b={tmp_path / 'nope.jsonl'}",
               "--batch-size", "2", "--no-progress", "--output", str(out)])
    _, stderr = capsys.readouterr()
    assert rc == 1
    errors = [line for line in stderr.splitlines() if line.startswith("dwjax evaluate: error:")]
    assert len(errors) == 3, stderr
    assert sum("a/missing" in e for e in errors) == 1 and sum("a/cut" in e and "truncated" in e for e in errors) == 1
    assert sum("nope.jsonl" in e for e in errors) == 1
    assert "audio-s/s" not in stderr                                   # --no-progress
    res = json.loads(out.read_text())
    assert [s["name"] for s in res["sets"]] == ["a"] and res["sets"][0]["n"] == 2 and res["n_failed"] == 3


# ---------------------------------------------------------------------------------------------- pseudo-label


@pytest.fixture()
def one_device(monkeypatch):
    """`dwjax pseudo-label` on one CPU device (the suite's conftest makes 8): one small compiled step."""
    import jax

    import dwjax.pseudo_label as pl
    real = pl.label_datasets
    monkeypatch.setattr(pl, "label_datasets", lambda specs, opts, cfg=None, devices=None:
                        real(specs, opts, cfg, devices=jax.devices()[:1]))


def _pl_rows(output) -> dict:
    from dwjax.pseudo_label import read_labels
    return {r["id"]: r for r in read_labels(output).to_pylist()}


def test_pseudo_label_silence_is_no_speech_without_a_label(corpus, tmp_path, capsys, one_device):
    out = tmp_path / "labels"
    rc = main(["pseudo-label", "--teacher", MODEL, "--data", f"s={corpus['with_silence']}", "--output", str(out),
               "--batch-size", "4", "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr                   # no speech is a finding, not a failure
    rows = _pl_rows(out)
    assert rows["silence"]["status"].startswith("no speech: silent audio")
    assert rows["silence"]["text"] is None and rows["silence"]["token_ids"] is None and rows["silence"]["wer"] is None
    assert rows["silence"]["duration_s"] == pytest.approx(3.0)
    for key in ("good0", "good1"):
        assert rows[key]["status"] == "ok" and rows[key]["text"]
    summary = json.loads((out / "summary.json").read_text())["overall"]
    assert (summary["rows"], summary["ok"], summary["no_speech"], summary["failed"]) == (3, 2, 1, 0)
    assert summary["failures"] == {}
    assert "no-speech rows" in stdout and "error" not in stderr
    # the training loader reads only labelled rows
    from dwjax.pseudo_label import is_failure
    assert not is_failure(rows["silence"]["status"]) and is_failure("missing audio: x")


def test_whisper_no_speech_rule():
    from dwjax.pseudo_label.rows import no_speech_status
    assert no_speech_status(3.0, 0.87, -1.5).startswith("no speech: teacher no-speech probability 0.87")
    assert no_speech_status(3.0, 0.87, -0.4) is None      # confident decoding: speech (Whisper's rule)
    assert no_speech_status(3.0, 0.20, -1.5) is None
    assert no_speech_status(45.0, 0.87, -1.5) is None     # long-form: per window, not per recording


def test_pseudo_label_exits_1_when_rows_failed(corpus, tmp_path, capsys, one_device):
    out = tmp_path / "labels"
    rc = main(["pseudo-label", "--teacher", MODEL, "--data", f"m={corpus['mixed_cut']}", "--output", str(out),
               "--batch-size", "4", "--no-progress"])
    _, stderr = capsys.readouterr()
    assert rc == 1
    rows = _pl_rows(out)
    assert rows["good0"]["status"] == "ok" and rows["good1"]["status"] == "ok"       # the good ones, written
    assert rows["missing"]["status"].startswith("missing audio: ")
    assert rows["cut"]["status"].startswith("unreadable audio: ") and "truncated" in rows["cut"]["status"]
    errors = [line for line in stderr.splitlines() if line.startswith("dwjax pseudo-label: error:")]
    assert len(errors) == 2 and sum("m/missing" in e for e in errors) == 1 and sum("m/cut" in e for e in errors) == 1
    assert "2 of 4 rows" in stderr and "Traceback" not in stderr
    # a rerun adds nothing and still reports the failed rows
    assert main(["pseudo-label", "--teacher", MODEL, "--data", f"m={corpus['mixed_cut']}", "--output", str(out),
                 "--batch-size", "4", "--no-progress"]) == 1
    assert len(_pl_rows(out)) == 4


# ---------------------------------------------------------------------------------------------- transcribe


def test_transcribe_names_each_file_and_exits_1(corpus, capsys):
    root = corpus["root"]
    paths = [root / "good0.flac", root / "missing.flac", root / "silence.wav", root / "cut.wav", root / "good1.flac"]
    rc = main(["transcribe", "--model", MODEL, *map(str, paths)])
    stdout, stderr = capsys.readouterr()
    assert rc == 1
    lines = stdout.splitlines()
    assert [line.split("\t", 1)[0] for line in lines] == [str(root / "good0.flac"), str(root / "good1.flac")]
    from dwjax.text.wer import wer
    texts = [line.split("\t", 1)[1] for line in lines]
    assert wer([corpus["clips"][0][0], corpus["clips"][1][0]], texts) < 0.5
    errors = [line for line in stderr.splitlines() if line.startswith("dwjax transcribe: error:")]
    assert len(errors) == 3
    for name in ("missing.flac", "silence.wav", "cut.wav"):
        assert sum(name in e for e in errors) == 1, (name, errors)
    assert "truncated" in next(e for e in errors if "cut.wav" in e)
    assert "audio-s/s" in stderr and "Traceback" not in stderr           # progress over several files
    # one file: just its text, no name, no progress bar
    assert main(["transcribe", "--model", MODEL, str(root / "good0.flac")]) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout.strip() == texts[0] and "\t" not in stdout and "audio-s/s" not in stderr


# ---------------------------------------------------------------------------------------------- make-demo-data


def test_make_demo_data_progress_in_audio_seconds(tmp_path, capsys, monkeypatch):
    """The synthesis tools are faked (3 s per clip): the bar on stderr reports audio-s/s, stdout the summary."""
    import dwjax.demo.synthesis as demo
    monkeypatch.setattr(demo, "check_tools", lambda: None)
    monkeypatch.setattr(demo, "synthesise", lambda clip, path: 3.0)
    assert main(["make-demo-data", "--output", str(tmp_path / "d"), "--hours", "0.01", "--workers", "1"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "audio-s/s" in stderr and "clips" in stderr
    assert "audio-s/s" not in stdout and "12 clips" in stdout
