"""Multilingual data, labels, training prompts and evaluation (issue 14), and its bad inputs: an unknown language
code, a language the teacher does not support, an English-only teacher with a non-English set, mixed scripts:
one line each on stderr, everything else still labelled / scored.

Speech: flite / espeak-ng; models: builtin tiny.en (English-only) for the runs, builtin base's tokenizer and
weights for the language checks (no multilingual decoding here: tests/test_multilingual_decoding.py, slow).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from dwjax.audio import SAMPLE_RATE
from dwjax.cli import main
from dwjax.errors import UserError

EN_ONLY = "builtin:whisper-tiny.en"
have_tools = all(shutil.which(tool) for tool in ("flite", "espeak-ng", "sox"))
needs_tools = pytest.mark.skipif(not have_tools, reason="needs flite, espeak-ng and sox")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Two English clips and one German clip (espeak-ng) as files, with a manifest builder."""
    if not have_tools:
        pytest.skip("needs flite, espeak-ng and sox")
    import subprocess

    from tests.helpers import synthesize
    root = tmp_path_factory.mktemp("ml_speech")
    english = synthesize(root / "en", 2)
    for i, (_, audio) in enumerate(english):
        sf.write(root / f"en{i}.flac", audio, SAMPLE_RATE)
    subprocess.run(["espeak-ng", "-v", "de", "-w", str(root / "de0.wav"), "Der Hund schläft unter dem Tisch."],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"root": root, "english": [t for t, _ in english]}


@pytest.fixture()
def one_device(monkeypatch):
    """`dwjax pseudo-label` on one CPU device (the suite's conftest makes 8): one small compiled step."""
    import jax

    import dwjax.pseudo_label as pl
    real = pl.label_datasets
    monkeypatch.setattr(pl, "label_datasets", lambda specs, opts, cfg=None, devices=None:
                        real(specs, opts, cfg, devices=jax.devices()[:1]))


def _rows(out):
    from dwjax.pseudo_label import read_labels
    return {r["id"]: r for r in read_labels(out).to_pylist()}


def _errors(stderr, prefix):
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


# ---------------------------------------------------------------------------------------------- pseudo-label


def test_pseudo_label_bad_languages_one_line_each_rest_labelled(speech, tmp_path, capsys, one_device):
    root = speech["root"]
    rows = [{"id": "en0", "audio": "en0.flac", "text": speech["english"][0], "language": "en"},
            {"id": "en1", "audio": "en1.flac", "text": speech["english"][1]},
            {"id": "de0", "audio": "de0.wav", "text": "Der Hund schläft unter dem Tisch.", "language": "de"},
            {"id": "de1", "audio": "de0.wav", "text": "Der Hund schläft unter dem Tisch.", "language": "German"},
            {"id": "xx0", "audio": "en0.flac", "text": speech["english"][0], "language": "xx"},
            {"id": "xx1", "audio": "en1.flac", "text": speech["english"][1], "language": "xx"},
            {"id": "mix", "audio": "en1.flac", "text": "今日は晴れです hello", "language": "en"}]
    manifest = _jsonl(root / "bad_langs.jsonl", rows)
    out = tmp_path / "labels"
    rc = main(["pseudo-label", "--teacher", EN_ONLY, "--data", f"m={manifest}", "--output", str(out),
               "--batch-size", "4", "--no-progress"])
    _, stderr = capsys.readouterr()
    assert rc == 1 and "Traceback" not in stderr
    got = _rows(out)
    assert len(got) == 7
    for key in ("en0", "en1"):                              # nothing else in the run lost
        assert got[key]["status"] == "ok" and got[key]["text"] and got[key]["language"] == "en"
        assert got[key]["metric"] == "wer" and got[key]["task"] == "transcribe"
    assert got["en0"]["language_source"] == "manifest" and got["en1"]["language_source"] == "detected"
    for key in ("de0", "de1"):
        assert got[key]["status"].startswith("unsupported language: the teacher builtin:whisper-tiny.en is "
                                             "English-only") and got[key]["token_ids"] is None
    for key in ("xx0", "xx1"):
        assert got[key]["status"].startswith("unknown language: unknown language 'xx'")
    assert got["mix"]["status"].startswith("mixed scripts: ")
    errors = _errors(stderr, "dwjax pseudo-label: error:")
    # one line per (dataset, language): de, German, xx; one for the mixed-script row
    assert len(errors) == 4, errors
    assert sum("m: 2 row(s) of language 'xx'" in e for e in errors) == 1
    assert sum("language 'de'" in e and "English-only" in e for e in errors) == 1
    assert sum("language 'German'" in e for e in errors) == 1
    assert sum(e.startswith("dwjax pseudo-label: error: m/mix: mixed scripts") for e in errors) == 1
    summary = json.loads((out / "summary.json").read_text())["overall"]
    assert summary["failures"] == {"mixed scripts": 1, "unknown language": 2, "unsupported language": 2}


def test_pseudo_label_run_options_refused_in_one_line(speech, tmp_path, capsys):
    manifest = _jsonl(speech["root"] / "en.jsonl", [{"id": "en0", "audio": "en0.flac", "text": "x"}])
    cases = [(["--teacher", EN_ONLY, "--language", "xx"], "unknown language 'xx'"),
             (["--teacher", EN_ONLY, "--language", "de"], "tiny.en is English-only; it cannot handle language 'de'"),
             (["--teacher", EN_ONLY, "--task", "translate"], "English-only"),
             (["--teacher", "builtin:whisper-base", "--language", "yue"], "does not support language 'yue'")]
    for args, message in cases:
        rc = main(["pseudo-label", *args, "--data", str(manifest), "--output", str(tmp_path / "o"),
                   "--no-progress"])
        _, stderr = capsys.readouterr()
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("WARNING", "I", "W"))]
        assert rc == 1 and message in stderr, stderr
        assert sum(line.startswith("dwjax pseudo-label: error:") for line in lines) == 1, lines


def test_translate_rows_for_an_english_only_teacher_refused(speech, tmp_path, capsys):
    manifest = _jsonl(speech["root"] / "tr.jsonl", [
        {"id": "de0", "audio": "de0.wav", "text": "The dog sleeps.", "language": "de", "task": "translate"}])
    rc = main(["pseudo-label", "--teacher", EN_ONLY, "--data", f"t={manifest}", "--output", str(tmp_path / "o"),
               "--no-progress"])
    _, stderr = capsys.readouterr()
    assert rc == 1
    assert "is English-only and cannot translate; 1 row(s) ask for task translate (first: t/de0)" in stderr


def test_teacher_language_checks_base(tmp_path):
    """The multilingual teacher: a language outside its vocabulary is "unsupported", a bad code "unknown"; the
    row's task and language source; no decoding (nothing is compiled)."""
    import jax

    from dwjax.data.manifest import Example
    from dwjax.mesh import make_mesh
    from dwjax.config import MeshConfig
    from dwjax.pseudo_label import LabelOptions
    from dwjax.pseudo_label.teacher import Teacher
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1, dcn_data=1), jax.devices()[:1])
    t = Teacher(LabelOptions(teacher="builtin:whisper-base", output=str(tmp_path)), mesh)
    assert t.language_id(Example("a", language="de")) == t.tok.languages["de"]
    assert t.language_id(Example("a", language="French")) == t.tok.languages["fr"]
    assert t.language_id(Example("a")) == -1
    assert t.language_id(Example("a", language="yue")).startswith("unsupported language: the teacher "
                                                                   "builtin:whisper-base does not support")
    assert t.language_id(Example("a", language="zz")).startswith("unknown language: ")
    assert t.check(Example("a", language="ja", text="hello there")).startswith("mixed scripts: none of its")
    assert t.check(Example("a", language="ja", text="The dog.", task="translate")) == t.tok.languages["ja"]
    assert t.task_id(Example("a", task="translate")) == t.tok.translate
    assert t.task_id(Example("a")) == t.tok.transcribe
    assert t.language_source(Example("a", language="de")) == "manifest"
    assert t.language_source(Example("a")) == "detected"


def test_row_wer_uses_the_rows_language():
    from dwjax.pseudo_label.rows import row_metric, row_wer
    assert row_wer("今日は晴れです", "今日は雨です", "ja") == pytest.approx(2 / 7)            # CER
    assert row_wer("Über den Fluß!", "über den fluss", "de") == pytest.approx(1 / 3)         # basic normaliser
    assert row_wer("Mr. Smith", "mister smith", "en") == 0.0                                  # English normaliser
    assert row_wer("The dog sleeps.", "the dog sleeps", "ja", "translate") == 0.0             # a translation
    assert (row_metric("ja", "transcribe"), row_metric("ja", "translate"), row_metric("de", None)) == \
        ("cer", "wer", "wer")


# ---------------------------------------------------------------------------------------------- manifests


def test_manifest_task_column(tmp_path):
    from dwjax.data.manifest import read_dataset, write_manifest
    path = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "audio": "a.wav", "task": "translate", "language": "de"},
                                         {"id": "b", "audio": "b.wav", "task": " Transcribe "},
                                         {"id": "c", "audio": "c.wav"}])
    ex = read_dataset(path)
    assert [e.task for e in ex] == ["translate", "transcribe", None]
    again = read_dataset(write_manifest(tmp_path / "n.jsonl", ex))
    assert [e.task for e in again] == ["translate", "transcribe", None]
    _jsonl(tmp_path / "bad.jsonl", [{"id": "a", "audio": "a.wav", "task": "summarise"}])
    with pytest.raises(UserError, match="line 1: task 'summarise' is neither transcribe nor translate"):
        read_dataset(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------------------------------- training prompts


def _label_dir(tmp_path, tok, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dwjax.pseudo_label import SCHEMA
    full = []
    for r in rows:
        base = {f.name: None for f in SCHEMA}
        base.update(status="ok", reference=None, reference_encoding_errors=False, duration_s=1.0,
                    avg_logprob=-0.1, compression_ratio=1.0, no_speech_prob=0.0, dataset="d")
        base.update(r)
        full.append(base)
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.Table.from_pylist(full, schema=SCHEMA), tmp_path / "labels" / "labels-00000-of-00001-part00000.parquet")
    return str(tmp_path / "labels")


def test_training_prompt_keeps_each_rows_language_and_task(tmp_path):
    from dwjax.data.loader import LabelEncoder, TrainBatches, read_labelled
    from dwjax.weights.loading import load_model
    tok = load_model("builtin:whisper-base").tokenizer
    hallo, hello = tok.encode(" Hallo Welt."), tok.encode(" Hello world.")
    path = _label_dir(tmp_path, tok, [
        {"id": "a", "audio": "a.wav", "token_ids": hallo, "language": "de", "task": "transcribe"},
        {"id": "b", "audio": "b.wav", "token_ids": hello, "language": "de", "task": "translate"},
        {"id": "c", "audio": "c.wav", "token_ids": hallo, "language": "fr"},          # labels without `task`
    ])
    s, _ = read_labelled("d", path, rule=None)
    assert (s.language, s.task) == (["de", "de", "fr"], ["transcribe", "translate", "transcribe"])
    enc = LabelEncoder(tok, 32, timestamp_probability=0.0)
    batches = TrainBatches([s], enc, global_batch=3, seed=0, workers=1)
    try:
        labels = batches.labels(0)
    finally:
        batches.close()
    rows = batches.rows(0)
    L, T = tok.languages, {"transcribe": tok.transcribe, "translate": tok.translate}
    for r, (_, i) in enumerate(rows):
        want = [tok.sot, L[s.language[i]], T[s.task[i]], tok.no_timestamps]
        inp = labels["decoder_input_ids"][r].tolist()
        assert inp[:4] == want, (s.ids[i], inp[:6])
        assert inp[4: 4 + len(s.tokens[i])] == s.tokens[i]
        # SOT -> language is trained (language detection); task and <|notimestamps|> (forced) are masked
        assert labels["labels"][r][0] == L[s.language[i]] and labels["loss_mask"][r][0] == 1
        assert labels["loss_mask"][r][1:3].sum() == 0 and labels["loss_mask"][r][3] == 1
    # a set's config language / task override every row's
    s2, _ = read_labelled("d", path, rule=None, language="Spanish", task="translate")
    assert (set(s2.language), set(s2.task)) == ({"es"}, {"translate"})
    seq, n_prompt = enc.encode(s2.tokens[0], s2.language[0], np.random.default_rng(0), task=s2.task[0])
    assert seq[:n_prompt] == [tok.sot, L["es"], tok.translate, tok.no_timestamps]
    with pytest.raises(UserError, match="task must be transcribe or translate"):
        read_labelled("d", path, rule=None, task="summarise")


def test_config_dataset_language_and_task():
    from dwjax import config as C
    from dwjax.errors import ConfigError
    cfg = C.load_config(overrides=["data.train=[{name: a, path: b, language: de, task: translate}]"])
    assert (cfg.data.train[0].language, cfg.data.train[0].task) == ("de", "translate")
    assert C.load_config(overrides=["data.train=[{name: a, path: b}]"]).data.train[0].language is None
    with pytest.raises(ConfigError, match="data.train a language: unknown language 'xx'"):
        C.load_config(overrides=["data.train=[{name: a, path: b, language: xx}]"])
    with pytest.raises(ConfigError, match="task"):
        C.load_config(overrides=["data.train=[{name: a, path: b, task: summarise}]"])


# ---------------------------------------------------------------------------------------------- demo data


@needs_tools
def test_make_demo_data_languages(tmp_path, capsys):
    from dwjax.demo.sentences import translated_sentences
    rc = main(["make-demo-data", "--output", str(tmp_path / "d"), "--hours", "0.008", "--languages", "en,de,fr,es",
               "--splits", "train=0.5,test=0.5", "--workers", "1", "--no-progress"])
    assert rc == 0
    rows = [json.loads(x) for split in ("train", "test")
            for x in (tmp_path / "d" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    langs = [r["language"] for r in rows]
    assert set(langs) == {"en", "de", "fr", "es"}
    assert max(langs.count(x) for x in set(langs)) - min(langs.count(x) for x in set(langs)) <= 1   # balanced
    for r in rows:
        assert (tmp_path / "d" / r["audio"]).exists()
        if r["language"] == "en":
            assert "translation" not in r and r["voice"].split(":")[0] in ("flite", "espeak-ng")
        else:
            assert (r["text"], r["translation"]) in translated_sentences(r["language"])
            assert r["voice"].startswith(f"espeak-ng:{r['language']}")
    tr = [json.loads(x) for split in ("train", "test")
          for x in (tmp_path / "d" / f"{split}.translate.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["id"] for r in tr} == {r["id"] for r in rows if r["language"] != "en"}
    assert all(r["task"] == "translate" and "translation" not in r for r in tr)
    from dwjax.data.manifest import read_dataset
    assert {e.task for e in read_dataset(tmp_path / "d" / "test.translate.jsonl")} == {"translate"}
    # bad --languages: one line
    for bad, message in (("en,xx", "unknown language 'xx'"), ("en,ja", "no demo voices and sentences for language")):
        assert main(["make-demo-data", "--output", str(tmp_path / "e"), "--languages", bad, "--no-progress"]) == 1
        assert message in capsys.readouterr().err


def test_every_language_has_sentences_voices_and_its_own_script():
    from dwjax.demo.synthesis import ESPEAK_LANGUAGE_VOICES
    from dwjax.demo.sentences import sentence_languages, translated_sentences
    from dwjax.text.languages import script_problem
    assert sentence_languages() == sorted(ESPEAK_LANGUAGE_VOICES)
    for language in sentence_languages():
        pairs = translated_sentences(language)
        assert len(pairs) >= 24 and len({s for s, _ in pairs}) == len(pairs)
        for sentence, english in pairs:
            assert script_problem(sentence, language) is None and script_problem(english, "en") is None


# ---------------------------------------------------------------------------------------------- evaluation


class _Tok:
    is_multilingual = True
    languages = {"en": 0, "zh": 1, "de": 2, "ja": 3, "nl": 4}


class _FakeMultilingual:
    """Hears clip k (constant sample value k / 100) as HYPS[k], in language LANGS[k]; translates to TRANS[k]."""
    batch_size = 4

    def __init__(self, hyps, langs, trans):
        from types import SimpleNamespace
        self.hyps, self.langs, self.trans = hyps, langs, trans
        self.tokenizer, self.cfg = _Tok(), SimpleNamespace(decoder_layers=2, encoder_layers=2)
        self.calls = []

    def _k(self, a):
        return int(round(float(np.asarray(a)[0]) * 100))

    def transcribe(self, audios, language=None, task="transcribe", progress=None, **kw):
        from types import SimpleNamespace
        self.calls.append((language, task, len(audios)))
        out = []
        for a in audios:
            k = self._k(a)
            text = self.trans[k] if task == "translate" else self.hyps[k]
            out.append(SimpleNamespace(text=text, language=language or self.langs[k], tokens=[]))
        if progress is not None:
            progress(list(range(len(audios))))
        return out


def test_evaluate_per_language_cer_wer_bleu_and_language_id(tmp_path, monkeypatch):
    import sacrebleu

    import dwjax.evaluation as ev
    from dwjax.evaluation_tables import markdown_table
    from dwjax.text.languages import score as language_score
    refs = ["Der Hund schläft unter dem Tisch.", "Die Katze sitzt auf dem Dach.", "今日は、晴れです。", "東京へ行きます",
            "The dog sleeps under the table.", "The cat is sitting on the roof."]
    langs = ["de", "de", "ja", "ja", "de", "de"]
    tasks = [None, None, None, None, "translate", "translate"]
    hyps = ["Der Hund schlaeft unter dem Tisch", "Die Katze sitzt auf dem Dach", "今日は雨です", "東京に行きます", "", ""]
    trans = ["", "", "", "", "The dog sleeps under the table.", "A cat sits on the roof."]
    heard = ["de", "nl", "ja", "ja", "de", "de"]              # the model's language ID: one German clip as Dutch
    rows = []
    for k, (r, lang, task) in enumerate(zip(refs, langs, tasks)):
        sf.write(tmp_path / f"c{k}.wav", np.full(SAMPLE_RATE, k / 100, np.float32), SAMPLE_RATE, subtype="FLOAT")
        rows.append({"id": f"c{k}", "audio": f"c{k}.wav", "text": r, "language": lang,
                     **({"task": task} if task else {})})
    manifest = _jsonl(tmp_path / "set.jsonl", rows)
    fake = _FakeMultilingual(hyps, heard, trans)
    teacher_says = ["de", "de", "ja", "zh", "de", "de"]
    monkeypatch.setattr(ev, "make_transcriber", lambda *a, **k: fake)
    monkeypatch.setattr(ev, "detect_languages", lambda tr, audios: [teacher_says[fake._k(a)] for a in audios])
    res = ev.evaluate("fake", [f"s={manifest}"], opts=ev.EvalOptions(teacher="fake-teacher"), log=lambda *_: None)
    table = {(r["language"], r["task"]): r for r in res["sets"][0]["languages"]}
    de, ja, tr = table[("de", "transcribe")], table[("ja", "transcribe")], table[("de", "translate")]
    assert (de["metric"], ja["metric"], tr["metric"]) == ("wer", "cer", "wer")
    assert de["error_rate"] == pytest.approx(language_score("de", refs[:2], hyps[:2])["rate"]) == pytest.approx(1 / 12)
    assert ja["error_rate"] == pytest.approx(3 / 14)          # 晴れ -> 雨 (2 edits of 7), へ -> に (1 of 7)
    assert tr["bleu"] == pytest.approx(sacrebleu.corpus_bleu(trans[4:], [refs[4:]]).score)
    assert de["bleu"] is None and 0 < tr["bleu"] < 100
    assert de["lid_accuracy"] == 0.5 and ja["lid_accuracy"] == 1.0 and tr["lid_accuracy"] == 1.0
    assert de["lid_agreement"] == 0.5 and ja["lid_agreement"] == 0.5 and ja["teacher_lid_accuracy"] == 0.5
    assert de["detected"] == {"de": 1, "nl": 1}
    # translate rows were decoded with task translate, the others detected (language None); the first group's
    # first batch once more, untimed, before (the warm-up)
    assert fake.calls == [(None, "transcribe", 4), (None, "transcribe", 4), (None, "translate", 2)]
    md = markdown_table(res)
    assert "| s | ja | transcribe | 2 | CER | 21.43 |" in md
    # --language manifest forces each row's language: one decoding group per (language, task)
    fake.calls.clear()
    ev.evaluate("fake", [f"s={manifest}"], opts=ev.EvalOptions(language="manifest"), log=lambda *_: None)
    assert {c[:2] for c in fake.calls} == {("de", "transcribe"), ("ja", "transcribe"), ("de", "translate")}


@needs_tools
def test_evaluate_bad_languages_one_line_each_rest_scored(speech, tmp_path, capsys):
    root = speech["root"]
    rows = [{"id": "en0", "audio": "en0.flac", "text": speech["english"][0], "language": "en"},
            {"id": "en1", "audio": "en1.flac", "text": speech["english"][1]},
            {"id": "de0", "audio": "de0.wav", "text": "Der Hund schläft unter dem Tisch.", "language": "de"},
            {"id": "xx0", "audio": "en0.flac", "text": "x", "language": "xx"},
            {"id": "xx1", "audio": "en0.flac", "text": "y", "language": "xx"},
            {"id": "mix", "audio": "en1.flac", "text": "今日は晴れです hello", "language": "en"}]
    manifest = _jsonl(root / "eval_bad.jsonl", rows)
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--model", EN_ONLY, "--data", f"e={manifest}", "--output", str(out), "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert rc == 1 and "Traceback" not in stderr
    errors = _errors(stderr, "dwjax evaluate: error:")
    assert len(errors) == 3, errors
    assert sum("e: 2 row(s) not scored: unknown language 'xx'" in e for e in errors) == 1
    assert sum("e/mix: reference text: mixed scripts" in e for e in errors) == 1
    assert sum("e: 1 row(s) of language 'de' not scored: builtin:whisper-tiny.en is English-only" in e
               for e in errors) == 1
    res = json.loads(out.read_text())
    assert res["sets"][0]["n"] == 2 and {f["id"] for f in res["sets"][0]["files"]} == {"en0", "en1"}
    assert res["sets"][0]["wer"] < 0.5
    for args, message in ((["--language", "xx"], "unknown language 'xx'"),
                          (["--language", "de"], "English-only; it cannot handle language 'de'")):
        assert main(["evaluate", "--model", EN_ONLY, "--data", f"e={manifest}", *args, "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert message in err and len(_errors(err, "dwjax evaluate: error:")) == 1


def test_label_summary_per_language_and_task():
    import pyarrow as pa

    from dwjax.pseudo_label import SCHEMA, format_summary, summarise
    cases = [("de", "transcribe", "Der Hund schläft.", "der hund schlaeft", "manifest"),
             ("de", "transcribe", "Die Katze.", "die katze", "detected"),
             ("ja", "transcribe", "今日は、晴れです。", "今日は雨です", "manifest"),
             ("de", "translate", "The dog sleeps.", "the dog sleeps", "manifest")]
    rows = []
    for k, (lang, task, ref, hyp, source) in enumerate(cases):
        row = {f.name: None for f in SCHEMA}
        row.update(id=f"r{k}", dataset="d", status="ok", language=lang, task=task, reference=ref, text=hyp,
                   wer=0.0, duration_s=1.0, reference_encoding_errors=False, language_source=source)
        rows.append(row)
    summary = summarise(pa.Table.from_pylist(rows, schema=SCHEMA))
    langs = summary["datasets"]["d"]["languages"]
    assert langs["de/transcribe"] == {"ok": 2, "metric": "wer", "corpus": pytest.approx(1 / 5), "detected": 1}
    assert langs["ja/transcribe"]["metric"] == "cer" and langs["ja/transcribe"]["corpus"] == pytest.approx(2 / 7)
    assert langs["de/translate"]["corpus"] == 0.0
    assert "d by language/task: de/transcribe 2 ok, WER 20.0 % (1 detected); de/translate 1 ok, WER 0.0 %; " \
           "ja/transcribe 1 ok, CER 28.6 %" in format_summary(summary)
