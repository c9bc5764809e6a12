"""dwjax evaluate / dwjax report: scoring, noise mixing, long-form plumbing, JSON, markdown and plots (fast, with
a fake transcriber), and (slow) the real CLI with builtin tiny.en on real or synthesised clips."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from dwjax.audio import SAMPLE_RATE
from dwjax.cli.report import main as report_main
from dwjax.errors import UserError
from dwjax.evaluation import EvalOptions, evaluate, score
from dwjax.evaluation_sets import noisy_audio
from dwjax.evaluation_tables import markdown_table

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


class FakeTokenizer:
    eot, timestamp_begin, sot = 1000, 1001, 1002
    is_multilingual = False

    def decode(self, ids):
        return " ".join(WORDS[i % len(WORDS)] for i in ids if i < self.eot)


class FakeTranscriber:
    """Hears one word per second: the word index is the sample value (clean) -- noise corrupts words."""
    def __init__(self):
        self.tokenizer, self.batch_size, self.cfg = FakeTokenizer(), 4, SimpleNamespace(decoder_layers=4,
                                                                                          encoder_layers=4)

    def _ids(self, audio):
        v = np.round(np.asarray(audio, np.float64)).astype(int)
        starts = np.flatnonzero(np.diff(np.concatenate([[-1], v])) != 0)
        runs = np.diff(np.concatenate([starts, [len(v)]]))
        return [int(v[s]) for s, n in zip(starts, runs) if v[s] > 0 and n >= SAMPLE_RATE // 2]

    def transcribe_batch(self, audios, **kw):
        return [SimpleNamespace(tokens=self._ids(a), text=self.tokenizer.decode(self._ids(a)), language=None,
                                avg_logprob=-0.1, no_speech_prob=0.0) for a in audios]

    def transcribe(self, audios, **kw):
        return self.transcribe_batch(audios)


@pytest.fixture()
def dataset(tmp_path):
    rows = []
    for i in range(6):
        ids = [(i + j) % len(WORDS) for j in range(3)]
        audio = np.repeat(np.asarray(ids, np.float32), SAMPLE_RATE) + 0.001 * np.sin(np.arange(3 * SAMPLE_RATE))
        audio[audio < 0.5] += 10.0       # index 0 is audible too (10 -> "alpha")
        path = tmp_path / f"u{i}.wav"
        sf.write(path, audio / 16.0, SAMPLE_RATE, subtype="FLOAT")
        rows.append({"id": f"u{i}", "audio": path.name, "text": " ".join(WORDS[k] for k in ids).title() + "."})
    manifest = tmp_path / "set.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest


class ScaledFake(FakeTranscriber):
    def _ids(self, audio):
        return super()._ids(np.asarray(audio) * 16.0)


def test_score_parts():
    s = score(["The cat sat.", "Hello there"], ["the cat sat", "hello hello there"])
    assert s["wer"] == pytest.approx(1 / 5) and s["ier"] == pytest.approx(1 / 5)
    assert s["orthographic_wer"] > s["wer"]
    assert s["repeated_5grams"] == 0
    assert score(["a b c d e"], ["a b c d e a b c d e"])["repeated_5grams"] == 1


def test_evaluate_fake_end_to_end(dataset, tmp_path):
    opts = EvalOptions(batch_size=4, long_form="chunked", long_form_seconds=8, noise="white", snrs=(30, -10))
    res = evaluate("fake-teacher", [f"demo={dataset}"], opts=opts, transcriber=ScaledFake(), log=lambda *_: None)
    s = res["sets"][0]
    assert s["name"] == "demo" and s["n"] == 6 and s["wer"] == 0.0 and s["orthographic_wer"] > 0
    assert s["audio_s"] == pytest.approx(18.0) and s["rtf"] > 0 and s["audio_s_per_s"] > 0
    assert [f["id"] for f in s["files"]] == [f"u{i}" for i in range(6)]
    assert s["long_form"]["recordings"] >= 1 and s["long_form"]["wer"] == 0.0
    assert set(s["noise"]["snr"]) == {"30", "-10"}
    assert s["noise"]["snr"]["-10"]["wer"] > s["noise"]["snr"]["30"]["wer"]
    assert res["macro"]["wer"] == 0.0 and set(res["macro"]["noise"]) == {"30", "-10"}
    table = markdown_table(res)
    assert "| demo | 6 |" in table and "macro" in table and "-10 dB" in table
    # JSON round trip and the report
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(res, default=float))
    res2 = dict(res, label="fake-student", kind="student", macro=dict(res["macro"], rtf=res["macro"]["rtf"] / 3))
    b.write_text(json.dumps(res2, default=float))
    out = tmp_path / "report"
    assert report_main([str(a), str(b), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "fake-student" in md and "3.00x" in md
    assert (out / "wer_vs_latency.png").stat().st_size > 1000 and (out / "wer_vs_snr.png").stat().st_size > 1000


def test_noise_is_deterministic_and_at_snr(dataset):
    from dwjax.evaluation import load_set
    _, items = load_set(str(dataset))
    for kind in ("white", "babble"):
        x = noisy_audio(items, kind, 5.0, seed=3)
        y = noisy_audio(items, kind, 5.0, seed=3)
        assert all(np.array_equal(p, q) for p, q in zip(x, y))
        for (_, _, clean), noisy in zip(items, x):
            noise = noisy.astype(np.float64) - clean
            snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise ** 2))
            assert snr == pytest.approx(5.0, abs=0.01)
    assert not np.array_equal(noisy_audio(items, "white", 5.0, seed=4)[0], x[0])


def test_cli_errors(dataset, tmp_path):
    from dwjax.cli import main as dwjax_main
    from dwjax.cli.evaluate import main as eval_main
    with pytest.raises(UserError):
        eval_main(["--data", str(dataset)])
    with pytest.raises(UserError):
        eval_main(["--model", "x", "--data", str(dataset), "--snr", "a,b"])
    bad = tmp_path / "c.yaml"
    bad.write_text("modle: x\n")
    with pytest.raises(UserError):
        eval_main(["--config", str(bad)])
    assert dwjax_main(["report", str(tmp_path / "missing.json"), "--output", str(tmp_path)]) == 1


@pytest.mark.slow
def test_cli_tiny_en_real_clips(tmp_path, capsys):
    from dwjax.cli import main as dwjax_main
    from tests.helpers import real_clips, synthesize
    clips = real_clips(8) or synthesize(tmp_path / "wav", 8)
    rows = []
    for i, (text, audio) in enumerate(clips):
        sf.write(tmp_path / f"c{i}.wav", audio, SAMPLE_RATE)
        rows.append({"id": f"c{i}", "audio": f"c{i}.wav", "text": text})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "r.json"
    assert dwjax_main(["evaluate", "--model", "builtin:whisper-tiny.en", "--data", f"real={tmp_path / 'm.jsonl'}",
                       "--noise", "white", "--snr", "10,0", "--batch-size", "4", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sets"][0]["wer"] < 0.3
    assert res["sets"][0]["noise"]["snr"]["0.0"]["wer"] >= res["sets"][0]["noise"]["snr"]["10.0"]["wer"] - 0.05
    assert dwjax_main(["report", str(out), "--output", str(tmp_path / "rep")]) == 0
    assert "WER" in capsys.readouterr().out


def test_kind_from_the_models_metadata(dataset):
    """A student made by `init-student` (metadata kind "student") is reported as a student whatever its depth (a 4-3
    student was labelled "teacher" by the decoder_layers <= 2 rule); without metadata the depth decides."""
    def kind(decoder_layers, metadata):
        tr = ScaledFake()
        tr.cfg = SimpleNamespace(decoder_layers=decoder_layers, encoder_layers=4)
        tr.loaded = SimpleNamespace(metadata=metadata)
        return evaluate("m", [f"demo={dataset}"], opts=EvalOptions(batch_size=4), transcriber=tr,
                        log=lambda *_: None)["kind"]
    assert kind(3, {"kind": "student"}) == "student"
    assert kind(3, {}) == "teacher"
    assert kind(2, {}) == "student"
