"""Packing short clips into <= 30 s windows (dwjax.data.packing) and `dwjax pseudo-label --pack` (issue 16).

Pure packing: on random durations / sources / gaps no utterance is split, lost or repeated, every window is
<= max_s, sources are never mixed, windows are greedy (the next clip of a source did not fit), offsets are the sums of
durations and gaps, references join only when every member has one, the token budget holds. Labelling: 7 short
synthesised clips (flite / espeak-ng) of two speakers with an unreadable and a silent clip in the middle of them,
builtin tiny.en: one row per window, the bad clips on rows of their own and their neighbours packed, members and
offsets recorded, timestamps inside the window and near the clip boundaries, the window's WER against the joined
references; a rerun skips the packed clips; other packing options are refused; a window whose decoding reaches the
token budget is split, never written truncated.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwjax.data.packing import (DEFAULT_GAP_S, Utterance, members_from_json, members_json, pack, window_audio,
                                window_id, window_target_s)

TEACHER = "builtin:whisper-tiny.en"
SR = 16000

# ---------------------------------------------------------------------------------------------- pure packing

utterance_lists = st.lists(
    st.tuples(st.floats(0.05, 40.0, allow_nan=False), st.sampled_from([None, "A", "B", "C"]),
              st.one_of(st.none(), st.sampled_from(["", "hello there", "a b c"])), st.integers(1, 60)),
    min_size=0, max_size=60)


@settings(max_examples=300, deadline=None)
@given(utterance_lists, st.floats(0.0, 2.0), st.floats(1.0, 30.0), st.one_of(st.none(), st.integers(1, 200)))
def test_pack_never_splits_mixes_or_exceeds(items, gap, max_s, max_tokens):
    utts = [Utterance(f"u{i:03d}", d, text, src, tok) for i, (d, src, text, tok) in enumerate(items)]
    p = pack(utts, max_s=max_s, gap_s=gap, max_tokens=max_tokens)
    by_id = {u.id: u for u in utts}
    packed = [m.id for w in p.windows for m in w.members]
    # every utterance exactly once: in one window, or unpacked because it alone is longer than max_s
    assert sorted(packed + [u.id for u in p.unpacked]) == sorted(by_id)
    assert len(packed) == len(set(packed))
    assert [u.id for u in p.unpacked] == [u.id for u in utts if u.duration_s > max_s + 1e-9]
    assert len({w.id for w in p.windows}) == len(p.windows)
    for w in p.windows:
        assert w.id == window_id(w.members[0].id, len(w.members))
        assert w.duration_s <= max_s + 1e-9                           # <= 30 s (max_s) windows
        assert {by_id[m].source for m in w.ids} == {w.source}          # never two sources in one window
        for m in w.members:                                             # no utterance split: whole durations
            assert m.duration_s == by_id[m.id].duration_s
        if max_tokens is not None and len(w.members) > 1:
            assert sum(by_id[m].tokens for m in w.ids) <= max_tokens
        refs = [by_id[m].text for m in w.ids]
        if all(r and r.strip() for r in refs):
            assert w.reference == " ".join(r.strip() for r in refs)
        else:
            assert w.reference is None
    # consecutive and in order within a source; greedy: a window closes only when the next clip does not fit
    for src in {u.source for u in utts}:
        order = [u.id for u in utts if u.source == src and u.duration_s <= max_s + 1e-9]
        wins = [w for w in p.windows if w.source == src]
        assert [m for w in wins for m in w.ids] == order
        for w, nxt in zip(wins, wins[1:]):
            first = by_id[nxt.members[0].id]
            too_long = w.duration_s + gap + first.duration_s > max_s + 1e-9
            too_many = max_tokens is not None and sum(by_id[m].tokens for m in w.ids) + first.tokens > max_tokens
            assert too_long or too_many, (w, nxt)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 6 * SR), min_size=1, max_size=12), st.sampled_from([0.0, 0.25, 0.5, 1.0]))
def test_offsets_are_sums_of_durations_and_gaps(samples, gap):
    utts = [Utterance(f"c{i}", n / SR) for i, n in enumerate(samples)]
    for w in pack(utts, gap_s=gap).windows:
        first = int(w.members[0].id[1:])
        for k, m in enumerate(w.members):
            expect = sum(samples[first: first + k]) / SR + k * gap
            assert abs(m.offset_s - expect) < 1e-6
        assert abs(w.duration_s - (sum(samples[first: first + len(w.members)]) / SR + (len(w.members) - 1) * gap)) < 1e-6


def test_window_audio_places_each_clip_at_its_offset():
    rng = np.random.default_rng(0)
    clips = [rng.uniform(0.1, 1.0, n).astype(np.float32) for n in (8000, 12345, 4000, 30001)]
    p = pack([Utterance(f"c{i}", len(a) / SR) for i, a in enumerate(clips)], gap_s=DEFAULT_GAP_S)
    assert len(p.windows) == 1 and DEFAULT_GAP_S == 0.5
    w = p.windows[0]
    audio = window_audio(w, clips)
    assert len(audio) == round(w.duration_s * SR)
    mask = np.zeros(len(audio), bool)
    for m, a in zip(w.members, clips):
        s = round(m.offset_s * SR)
        np.testing.assert_array_equal(audio[s: s + len(a)], a)
        mask[s: s + len(a)] = True
    assert not audio[~mask].any() and (~mask).sum() == 3 * 8000       # three gaps of zeros, 0.5 s each
    with pytest.raises(ValueError):
        window_audio(w, [clips[0], clips[1], clips[2], clips[3][:-100]])   # the offsets no longer describe it
    assert [m["offset_s"] for m in members_from_json(members_json(w))] == [m.offset_s for m in w.members]


def test_short_windows_are_a_seeded_fraction_and_keep_every_rule():
    """--pack-short: a fraction of windows is filled to a random shorter target; the rest of the rules hold."""
    utts = [Utterance(f"u{i:04d}", 2.0 + (i % 5) * 0.5, source=f"s{i // 400}") for i in range(2000)]
    full = pack(utts, max_s=24.0)
    short = pack(utts, max_s=24.0, short_fraction=0.3, seed=1)
    assert pack(utts, max_s=24.0, short_fraction=0.3, seed=1) == short                 # a pure function
    assert pack(utts, max_s=24.0, short_fraction=0.0, seed=5) == full                  # 0: the plain packing
    assert [m.id for w in short.windows for m in w.members] == [u.id for u in utts]    # all, once, in order
    # which windows were drawn short is recomputed independently of pack: target below max_s
    drawn = [window_target_s(w.members[0].id, 24.0, 0.3, 1) < 24.0 for w in short.windows]
    assert 0.25 < np.mean(drawn) < 0.35, np.mean(drawn)
    by_id = {u.id: u for u in utts}
    for w, is_short in zip(short.windows, drawn):
        target = window_target_s(w.members[0].id, 24.0, 0.3, 1)
        assert w.duration_s <= max(target, w.members[0].duration_s) + 1e-9
        assert w.duration_s <= 24.0 + 1e-9 and {by_id[i].source for i in w.ids} == {w.source}
    # short windows hold fewer clips: the lengths spread over (0, 24] instead of piling up near 24 s
    lengths = np.array([w.duration_s for w in short.windows])
    # (without it only the last window of each of the 5 sources can be short: 5 of ~300)
    assert (lengths < 8).mean() > 0.08 and (np.array([w.duration_s for w in full.windows]) < 8).mean() < 0.03
    with pytest.raises(ValueError):
        pack(utts, short_fraction=1.5)


def test_pack_edge_cases():
    assert pack([]).windows == [] and pack([]).unpacked == []
    p = pack([Utterance("a", 31.0), Utterance("b", 30.0), Utterance("c", 0.2)])
    assert [u.id for u in p.unpacked] == ["a"] and [w.ids for w in p.windows] == [["b"], ["c"]]
    # one utterance over the token budget alone still gets a window; never merged with another
    p = pack([Utterance("a", 1.0, tokens=50), Utterance("b", 1.0, tokens=5), Utterance("c", 1.0, tokens=5)],
             max_tokens=20)
    assert [w.ids for w in p.windows] == [["a"], ["b", "c"]]
    # sources group in order of first appearance, each in input order
    p = pack([Utterance("x1", 1, source="X"), Utterance("y1", 1, source="Y"), Utterance("x2", 1, source="X")])
    assert [(w.source, w.ids) for w in p.windows] == [("X", ["x1", "x2"]), ("Y", ["y1"])]
    with pytest.raises(ValueError):
        pack([Utterance("a", 1.0)], max_s=31)


def test_other_packing_options_are_refused(tmp_path):
    from dwjax.errors import UserError
    from dwjax.pseudo_label import LabelOptions
    from dwjax.pseudo_label.options import OPTIONS_FILE, check_options
    opts = LabelOptions(teacher=TEACHER, output=str(tmp_path))
    old = {k: v for k, v in opts.fixed().items() if not k.startswith("pack")}     # a run before --pack existed
    (tmp_path / OPTIONS_FILE).write_text(json.dumps(old))
    assert check_options(tmp_path, opts) is not None                             # same options: accepted
    import dataclasses
    for change in (dict(pack=True), dict(pack_gap_s=0.3), dict(pack_max_s=20.0)):
        with pytest.raises(UserError, match=next(iter(change))):
            check_options(tmp_path, dataclasses.replace(opts, **change))


# ---------------------------------------------------------------------------------------------- pseudo-label --pack


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 synthesised clips, speakers A (u0-u2) and B (u3-u5); an unreadable clip between u0 and u1 (id order) and
    a silent one between u3 and u4, both of their speaker."""
    import soundfile as sf

    from tests.helpers import synthesize
    root = tmp_path_factory.mktemp("packing")
    try:
        clips = synthesize(root / "speech", 6)
    except RuntimeError as e:
        pytest.skip(f"no speech synthesiser: {e}")
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really audio" * 8)
    sf.write(root / "silence.wav", np.zeros(2 * SR, np.float32), SR)
    rows = [{"id": f"u{i}", "audio": f"speech/utt{i:03d}.wav", "text": clips[i][0], "speaker": "A" if i < 3 else "B"}
            for i in range(6)]
    rows += [{"id": "u0x", "audio": "corrupt.wav", "text": "corrupt", "speaker": "A"},
             {"id": "u3s", "audio": "silence.wav", "text": "", "speaker": "B"}]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "noref.jsonl").write_text("".join(json.dumps({"id": f"n{i}", "audio": f"speech/utt{i:03d}.wav"}) + "\n"
                                              for i in range(3)), encoding="utf-8")
    return {"root": root, "clips": clips, "manifest": root / "m.jsonl", "noref": root / "noref.jsonl"}


def _one_device(monkeypatch):
    import jax

    import dwjax.pseudo_label as pl
    real = pl.label_datasets
    monkeypatch.setattr(pl, "label_datasets", lambda specs, opts, cfg=None, devices=None:
                        real(specs, opts, cfg, devices=jax.devices()[:1]))


def _rows(output) -> dict:
    from dwjax.pseudo_label import read_labels
    return {r["id"]: r for r in read_labels(output).to_pylist()}


@pytest.fixture(scope="module")
def packed(corpus):
    from dwjax.cli import main
    out = corpus["root"] / "labels"
    with pytest.MonkeyPatch.context() as mp:
        _one_device(mp)
        rc = main(["pseudo-label", "--teacher", TEACHER, "--data", f"m={corpus['manifest']}", "--output", str(out),
                   "--batch-size", "2", "--no-progress", "--pack"])
    return {"rc": rc, "dir": out, "rows": _rows(out)}


def test_pack_one_row_per_window_bad_clips_on_their_own(corpus, packed):
    rows = packed["rows"]
    assert packed["rc"] == 1                       # the unreadable clip is a failed row (named on stderr)
    assert set(rows) == {"u0+3", "u3+3", "u0x", "u3s"}
    assert rows["u0x"]["status"].startswith("unreadable audio: ") and rows["u0x"]["members"] is None
    assert rows["u3s"]["status"].startswith("no speech: silent audio")
    a, b = rows["u0+3"], rows["u3+3"]
    for w, ids, spk in ((a, ["u0", "u1", "u2"], "A"), (b, ["u3", "u4", "u5"], "B")):
        assert w["status"] == "ok" and w["source"] == spk and w["audio"] is None
        members = json.loads(w["members"])
        assert [m["id"] for m in members] == ids       # the neighbours of the bad clips, packed together
        durations = [len(corpus["clips"][int(i[1])][1]) / SR for i in ids]
        assert [m["duration_s"] for m in members] == pytest.approx(durations, abs=1e-9)
        offsets = [sum(durations[:k]) + k * DEFAULT_GAP_S for k in range(len(ids))]
        assert [m["offset_s"] for m in members] == pytest.approx(offsets, abs=1e-6)
        assert w["duration_s"] == pytest.approx(offsets[-1] + durations[-1], abs=1e-6)
        assert w["duration_s"] <= 30.0
        assert all(m["audio"].endswith(f"utt{int(i[1]):03d}.wav") for m, i in zip(members, ids))
    summary = json.loads((packed["dir"] / "summary.json").read_text())
    o = summary["overall"]
    assert (o["rows"], o["ok"], o["failed"], o["no_speech"], o["windows"], o["packed_clips"]) == (4, 2, 1, 1, 2, 6)
    clip_s = sum(len(a) for _, a in corpus["clips"]) / SR
    assert o["audio_hours"] * 3600 == pytest.approx(clip_s, abs=1e-6)        # clip audio, not the gaps
    assert summary["options"]["pack"] is True and summary["options"]["timestamps"] is True
    assert summary["run"]["token_limit_splits"] == 0 and summary["run"]["token_limit_truncated"] == 0


def test_pack_label_wer_against_joined_reference(corpus, packed):
    import jiwer

    from dwjax.text.normalizer import normalize_english
    for key, idx in (("u0+3", range(0, 3)), ("u3+3", range(3, 6))):
        w = packed["rows"][key]
        joined = " ".join(corpus["clips"][i][0] for i in idx)
        assert w["reference"] == joined
        expect = jiwer.wer(normalize_english(joined), normalize_english(w["text"]))
        assert w["wer"] == pytest.approx(expect, abs=1e-12)
        assert w["wer"] < 0.3, (w["text"], joined)               # the teacher heard all three clips
    summary = json.loads((packed["dir"] / "summary.json").read_text())
    assert summary["overall"]["wer"]["median"] == pytest.approx(
        np.median([packed["rows"][k]["wer"] for k in ("u0+3", "u3+3")]))


def test_pack_timestamps_lie_in_the_window_near_clip_boundaries(packed):
    from tests.helpers import special_ids
    timestamp_begin = special_ids(51864)["timestamp_begin"]      # tiny.en's vocabulary
    for key in ("u0+3", "u3+3"):
        w = packed["rows"][key]
        segs = json.loads(w["timestamps"])
        members = json.loads(w["members"])
        assert len(segs) >= 2
        assert "".join(s["text"] for s in segs).strip() == w["text"]
        assert sum(t >= timestamp_begin for t in w["token_ids"]) >= 2 * len(segs) - 1   # timestamp tokens decoded
        prev_end = 0.0
        for s in segs:
            assert prev_end - 1e-9 <= s["start"] <= s["end"] <= w["duration_s"] + 0.02
            prev_end = s["end"]
        # each boundary between segments lies near a clip's start or end (the teacher places them loosely:
        # tiny.en puts some on whole seconds); a clip boundary is where the 0.5 s gaps of silence are
        bounds = [m["offset_s"] for m in members[1:]] + [m["offset_s"] + m["duration_s"] for m in members[:-1]]
        for s in segs[1:]:
            assert min(abs(s["start"] - b) for b in bounds) < 1.0, (s, bounds)


def test_pack_rerun_skips_packed_clips_and_refuses_other_options(corpus, packed, capsys, monkeypatch):
    from dwjax.cli import main
    _one_device(monkeypatch)
    argv = ["pseudo-label", "--teacher", TEACHER, "--data", f"m={corpus['manifest']}", "--output", str(packed["dir"]),
            "--batch-size", "2", "--no-progress", "--pack"]
    assert main(argv) == 1                         # still reports the failed row; labels nothing again
    assert _rows(packed["dir"]) == packed["rows"]
    capsys.readouterr()
    assert main(argv + ["--pack-gap", "0.3"]) == 1
    assert "pack_gap_s: 0.5 -> 0.3" in capsys.readouterr().err
    assert main(argv[:-1]) == 1                    # the same directory without --pack
    assert "pack: True -> False" in capsys.readouterr().err


def test_pack_window_at_the_token_budget_is_split_not_truncated(corpus, tmp_path, monkeypatch):
    """No references (no estimate before decoding) and a 24-token budget: a 3-clip window cannot end in it."""
    from dwjax.cli import main
    _one_device(monkeypatch)
    out = tmp_path / "labels"
    rc = main(["pseudo-label", "--teacher", TEACHER, "--data", f"n={corpus['noref']}", "--output", str(out),
               "--batch-size", "1", "--no-progress", "--pack", "--max-new-tokens", "24"])
    assert rc == 0
    rows = _rows(out)
    members = [m["id"] for r in rows.values() for m in json.loads(r["members"])]
    assert sorted(members) == ["n0", "n1", "n2"]                 # every clip once
    assert "n0+3" not in rows                                    # the full window was never written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["token_limit_splits"] >= 1
    budget = 24                                                   # min(24, 448 - prompt)
    for r in rows.values():
        assert r["status"] == "ok" and r["reference"] is None and r["wer"] is None
        if len(json.loads(r["members"])) > 1:
            assert len(r["token_ids"]) < budget                  # a multi-clip window ended within the budget
    truncated = sum(len(r["token_ids"]) >= budget for r in rows.values())
    assert truncated == summary["run"]["token_limit_truncated"]


def test_manifest_speaker_column(tmp_path):
    from dwjax.data.manifest import read_dataset
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "x", "audio": "x.wav", "speaker": "kathleen"}) + "\n"
                                      + json.dumps({"id": "y", "audio": "y.wav"}) + "\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text("id\taudio\tspeaker_id\nx\tx.wav\t7\ny\ty.wav\t\n", encoding="utf-8")
    for name in ("a.jsonl", "b.tsv"):
        rows = read_dataset(tmp_path / name)
        assert [r.speaker for r in rows] in (["kathleen", None], ["7", None])
