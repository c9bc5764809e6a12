"""Demo-data synthesis (flite/espeak-ng/sox), the sentence generator, and the manifest readers."""
import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dwjax.cli import main as dwjax_main
from dwjax.cli.make_demo_data import main as make_demo_main
from dwjax.demo.synthesis import make_demo_data, parse_splits
from dwjax.data.manifest import Example, read_dataset, write_manifest
from dwjax.demo.sentences import generate_sentences, number_to_words
from dwjax.errors import UserError

SPLITS = ("train", "validation", "test")
have_tools = all(shutil.which(tool) for tool in ("flite", "espeak-ng", "sox"))
needs_tools = pytest.mark.skipif(not have_tools, reason="needs flite, espeak-ng and sox")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def manifests(root):
    return {split: read_jsonl(Path(root) / f"{split}.jsonl") for split in SPLITS}


# ---------------------------------------------------------------- sentences

def test_sentences_deterministic_unique_prefix_stable():
    a = generate_sentences(3000, seed=3)
    assert a == generate_sentences(3000, seed=3)
    assert len(set(a)) == len(a)
    assert generate_sentences(50, seed=3) == a[:50]
    assert generate_sentences(50, seed=4) != a[:50]
    assert all(s[0].isupper() and s[-1] in ".?" for s in a)
    assert any(s.endswith("?") for s in a) and any(any(c.isdigit() for c in s) for s in a)
    # little repetition: many distinct word trigrams relative to the text
    words = " ".join(a).split()
    trigrams = set(zip(words, words[1:], words[2:]))
    assert len(trigrams) > 0.5 * len(words)


def test_number_to_words():
    assert number_to_words(0) == "zero"
    assert number_to_words(42) == "forty two"
    assert number_to_words(305) == "three hundred and five"
    assert number_to_words(12_019) == "twelve thousand and nineteen"
    with pytest.raises(ValueError):
        number_to_words(-1)


# ---------------------------------------------------------------- synthesis

@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    rc = make_demo_main(["--output", str(root), "--hours", "0.005", "--noise", "--seed", "5",
                         "--workers", "2", "--no-progress"])
    assert rc == 0
    return root


@needs_tools
def test_demo_manifests_and_audio(demo_dir):
    data = manifests(demo_dir)
    rows = [row for split in SPLITS for row in data[split]]
    assert all(data[split] for split in SPLITS), "each split gets at least one clip"
    assert sum(row["duration_s"] for row in rows) >= 0.005 * 3600
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        assert set(row) >= {"id", "audio", "text", "duration_s", "voice"}
        path = demo_dir / row["audio"]
        assert path.parent == demo_dir / "audio" and path.suffix == ".flac"
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.frames / 16000 - row["duration_s"]) < 1e-3
        audio, _ = sf.read(str(path), dtype="float32")
        assert np.isfinite(audio).all() and 0.05 < np.abs(audio).max() <= 1.0
        assert row["voice"].split(":")[0] in ("flite", "espeak-ng")
    # no sentence in two splits
    texts = {split: {row["text"] for row in data[split]} for split in SPLITS}
    assert not (texts["train"] & texts["validation"] or texts["train"] & texts["test"]
                or texts["validation"] & texts["test"])
    # no stray partial files
    assert not list((demo_dir / "audio").glob(".*part"))


@needs_tools
def test_demo_deterministic_and_idempotent(demo_dir, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in (demo_dir / "audio").iterdir()}
    summary = make_demo_data(demo_dir, hours=0.005, noise=True, seed=5, workers=1, progress=False)
    assert summary.synthesised == 0
    assert {p.name: p.stat().st_mtime_ns for p in (demo_dir / "audio").iterdir()} == before
    # a fresh directory with the same seed gives identical manifests and audio bytes
    make_demo_data(tmp_path, hours=0.005, noise=True, seed=5, workers=1, progress=False)
    assert manifests(tmp_path) == manifests(demo_dir)
    for row in manifests(tmp_path)["train"]:
        assert (tmp_path / row["audio"]).read_bytes() == (demo_dir / row["audio"]).read_bytes()


@needs_tools
def test_demo_other_seed_and_text_file(tmp_path):
    lines = ["The cat sat on the mat.", "It is a sunny day.", "Please close the door."]
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(lines + ["", lines[0]]) + "\n", encoding="utf-8")
    summary = make_demo_data(tmp_path / "out", hours=0.004, text_file=text, seed=1, workers=1,
                             splits="train=0.5,test=0.5", progress=False)
    assert set(summary.clips) == {"train", "test"} and not (tmp_path / "out" / "validation.jsonl").exists()
    rows = {s: read_jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "test")}
    assert {r["text"] for s in rows for r in rows[s]} <= set(lines)
    assert not ({r["text"] for r in rows["train"]} & {r["text"] for r in rows["test"]})


def test_demo_missing_tools(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="apt-get install flite espeak-ng sox"):
        make_demo_data(tmp_path / "out", hours=0.001, progress=False)
    assert dwjax_main(["make-demo-data", "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "apt-get install flite espeak-ng sox" in err


def test_parse_splits():
    assert parse_splits("train=0.9,validation=0.05,test=0.05") == pytest.approx(
        {"train": 0.9, "validation": 0.05, "test": 0.05})
    assert parse_splits("a=1,b=3") == {"a": 0.25, "b": 0.75}
    for bad in ("train", "train=x", "train=-1", "a=0,b=0", "a=1,a=2", "=1"):
        with pytest.raises(UserError):
            parse_splits(bad)


# ---------------------------------------------------------------- manifest readers

ROWS = [
    {"id": "a1", "audio": "clips/a1.flac", "text": 'He said "hi", then left', "language": "en"},
    {"id": "a2", "audio": "clips/a2.flac", "text": "line one\nline two", "language": "fr"},
    {"id": "a3", "audio": "/abs/a3.wav", "text": "", "language": ""},
]


def check_examples(examples, root, name):
    assert [e.id for e in examples] == ["a1", "a2", "a3"]
    assert examples[0].audio_path == str(root / "clips" / "a1.flac")
    assert examples[2].audio_path == "/abs/a3.wav"
    assert examples[0].text == 'He said "hi", then left'
    assert examples[1].text == "line one\nline two"
    assert examples[1].language == "fr" and examples[2].language is None
    assert all(e.dataset == name and e.audio_bytes is None and not e.encoding_errors for e in examples)


def test_jsonl_roundtrip(tmp_path):
    path = write_manifest(tmp_path / "sub" / "m.jsonl", ROWS)
    check_examples(read_dataset(path), tmp_path / "sub", "m")
    examples = read_dataset(f"mine={path}")
    assert examples[0].dataset == "mine"
    # Examples written back come out the same
    again = write_manifest(tmp_path / "other" / "copy.jsonl", examples)
    assert [(e.id, e.audio_path, e.text) for e in read_dataset(again)] == \
           [(e.id, e.audio_path, e.text) for e in examples]


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_csv_tsv_roundtrip(tmp_path, kind):
    path = tmp_path / f"m.{kind}"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "audio", "text", "language"],
                                delimiter="," if kind == "csv" else "\t")
        writer.writeheader()
        writer.writerows(ROWS)
    check_examples(read_dataset(path), tmp_path, "m")


def test_non_utf8_is_replaced_and_flagged(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,audio,text\nx1,a.wav,caf\xe9\nx2,b.wav,fine\n")
    with pytest.warns(UserWarning, match="not UTF-8"):
        examples = read_dataset(path)
    assert examples[0].text == "caf\ufffd" and examples[0].encoding_errors
    assert not examples[1].encoding_errors


def test_parquet_and_arrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    audio = pa.array([{"bytes": b"RIFFdata", "path": "x.wav"}, {"bytes": None, "path": "rel/y.wav"}],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"audio": audio, "sentence": ["one", None]})
    pq.write_table(table, tmp_path / "d.parquet")
    examples = read_dataset(tmp_path / "d.parquet")
    assert [e.id for e in examples] == ["d-00000000", "d-00000001"]
    assert examples[0].audio_bytes == b"RIFFdata" and examples[0].audio_path is None
    assert examples[1].audio_path == str(tmp_path / "rel" / "y.wav") and examples[1].text is None
    # a plain path column, in an arrow file
    plain = pa.table({"id": ["p", "q"], "audio": ["p.flac", "/abs/q.flac"], "text": ["x", "y"]})
    with pa.ipc.new_file(str(tmp_path / "plain.arrow"), plain.schema) as writer:
        writer.write_table(plain)
    examples = read_dataset(f"plain={tmp_path / 'plain.arrow'}")
    assert [(e.id, e.audio_path, e.dataset) for e in examples] == \
           [("p", str(tmp_path / "p.flac"), "plain"), ("q", "/abs/q.flac", "plain")]


def test_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    flac = tmp_path / "tone.flac"
    sf.write(str(flac), np.zeros(1600, dtype=np.float32), 16000)
    # build the struct column directly and cast it to Audio(decode=False): encoding through
    # datasets.Audio would need torchcodec, which the tests do not require
    struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"id": datasets.Value("string"), "audio": struct, "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"id": ["u1", "u2"],
         "audio": [{"bytes": flac.read_bytes(), "path": None}, {"bytes": None, "path": str(flac)}],
         "text": ["first", "second"]}, features=features).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "saved"))
    examples = read_dataset(tmp_path / "saved")
    assert [e.id for e in examples] == ["u1", "u2"] and examples[0].dataset == "saved"
    assert examples[0].audio_bytes == flac.read_bytes()
    # save_to_disk embeds local files, so the path-only row comes back as bytes too
    assert examples[1].audio_bytes == flac.read_bytes() or examples[1].audio_path == str(flac)
    assert examples[1].text == "second"
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="several splits.*test, train"):
        read_dataset(tmp_path / "dd")
    assert len(read_dataset(tmp_path / "dd" / "test")) == 2


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "text": "x"}\n', "no 'audio' column"),
    ('{"audio": "a.wav"}\n', "no 'id' column"),
    ('{"id": "a", "audio": "a.wav"}\n{"id": "a", "audio": "b.wav"}\n', "'a' appears more than once"),
    ('{"id": "a", "audio": "a.wav"}\nnot json\n', "line 2: not valid JSON"),
    ('["a", "a.wav"]\n', "expected a JSON object"),
    ("\n\n", "empty"),
])
def test_jsonl_errors(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_dataset(path)


@pytest.mark.parametrize("content, message", [
    ("id,text\na,x\n", "no 'audio' column \\(columns: id, text\\)"),
    ("id,audio\na,x.wav,extra\n", "line 2: 3 fields but the header has 2"),
    ("id,audio,text\na\n", "fewer fields"),
    ('id,audio,text\na,x.wav,"unclosed\n', "malformed CSV"),
    ("id,audio\n", "no rows"),
    ("id,audio\n,x.wav\n", "empty 'id'"),
])
def test_csv_errors(tmp_path, content, message):
    path = tmp_path / "m.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_dataset(path)


def test_spec_errors(tmp_path):
    with pytest.raises(UserError, match="no such manifest"):
        read_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="no such manifest"):
        read_dataset(f"name={tmp_path / 'missing.jsonl'}")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(UserError, match="unknown manifest format"):
        read_dataset(tmp_path / "m.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="not a dataset directory"):
        read_dataset(tmp_path / "empty_dir")
    with pytest.raises(UserError, match="audio bytes"):
        write_manifest(tmp_path / "x.jsonl", [Example(id="b", audio_bytes=b"x")])


@needs_tools
def test_demo_manifest_reads_back(demo_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        examples = read_dataset(demo_dir / "train.jsonl")
    rows = read_jsonl(demo_dir / "train.jsonl")
    assert [e.id for e in examples] == [r["id"] for r in rows]
    assert all(Path(e.audio_path).exists() and e.language == "en" for e in examples)
    assert [e.duration_s for e in examples] == [r["duration_s"] for r in rows]
