"""Run-on windows (issue 16: sequential long-form): a packed window whose audio runs on into the next window of its
speaker up to 30 s, labelled as Whisper labels a window cut mid-utterance (dwjax/data/loader.py: Run-on windows).

  * the label: the window's own tokens, then the next window's whole segments with their timestamps moved by its
    offset (which lands on the members' offsets to 0.02 s), then the start timestamp of the cut segment alone; a
    cut in the silence between utterances adds no lone timestamp; nothing runs on from a label that already ends
    with a lone start, or when less than 1 s would fit;
  * rows: which run on is a function of (seed, key); a run-on row runs on into its next window as labelled (not
    as run on itself), keeps its own plain text (the next window's previous-text prompt), changes its cache key,
    always trains with timestamps, and its 30 s of audio are its members at their offsets, cut at 30 s.
Hand-made members and the tiny test tokenizer (tests/test_packed_training.py's assets); the distillation of
run-on rows with and without the encoder cache is tests/test_packed_training.py::test_cache_gives_the_same_loss.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from tests.test_packed_training import _packed_set, _ts, assets  # noqa: F401 (assets is a fixture)


def _member(name: str, offset: float, duration: float) -> dict:
    return {"id": name, "offset_s": offset, "duration_s": duration, "audio": f"/nonexistent/{name}.flac"}


def _segment(tok, start: float, text: str, end: float) -> list[int]:
    return [_ts(tok, start)] + tok.encode(" " + text) + [_ts(tok, end)]


def test_cut_utterance_ends_the_label_with_its_start_timestamp(assets):
    from dwjax.data.loader import run_on_label
    tok = assets["tok"]
    # W: two utterances ending at 20.0 s; W': C whole (4 s) and D cut at 30 s (it starts 4.5 s into W')
    mem = [_member("a", 0.0, 10.0), _member("b", 10.5, 9.5)]
    toks = _segment(tok, 0.0, "one", 10.0) + _segment(tok, 10.5, "two", 20.0)
    nxt = [_member("c", 0.0, 4.0), _member("d", 4.5, 6.0), _member("e", 11.0, 2.0)]
    nxt_toks = _segment(tok, 0.0, "three", 4.0) + _segment(tok, 4.5, "four", 10.5) + _segment(tok, 11.0, "five", 13.0)
    members, tokens, speech = run_on_label(tok, mem, toks, nxt, nxt_toks)
    # W' starts after W's gap (0.5 s): at 20.5 s; 9.5 s of it fit
    assert tokens == toks + _segment(tok, 20.5, "three", 24.5) + [_ts(tok, 25.0)]
    assert [m["id"] for m in members] == ["a", "b", "c", "d"]
    assert [m["offset_s"] for m in members[2:]] == pytest.approx([20.5, 25.0])
    assert speech == pytest.approx(4.0 + 5.0)
    # every timestamp of the next window's part lies on its members' starts and ends
    times = [(t - tok.timestamp_begin) * 0.02 for t in tokens[len(toks):] if t >= tok.timestamp_begin]
    edges = [m["offset_s"] for m in members[2:]] + [members[2]["offset_s"] + 4.0]
    assert all(min(abs(t - e) for e in edges) <= 0.02 for t in times)


def test_cut_in_silence_adds_no_lone_timestamp(assets):
    from dwjax.data.loader import run_on_label
    tok = assets["tok"]
    mem = [_member("a", 0.0, 10.0), _member("b", 10.5, 9.5)]
    toks = _segment(tok, 0.0, "one", 10.0) + _segment(tok, 10.5, "two", 20.0)
    nxt = [_member("c", 0.0, 4.0), _member("d", 10.0, 2.0)]      # d starts after the 9.5 s that fit
    nxt_toks = _segment(tok, 0.0, "three", 4.0) + _segment(tok, 10.0, "four", 12.0)
    members, tokens, speech = run_on_label(tok, mem, toks, nxt, nxt_toks)
    assert tokens == toks + _segment(tok, 20.5, "three", 24.5)
    assert [m["id"] for m in members] == ["a", "b", "c"] and speech == pytest.approx(4.0)


def test_no_run_on_after_a_lone_start_or_without_room(assets):
    from dwjax.data.loader import run_on_label
    tok = assets["tok"]
    nxt = [_member("c", 0.0, 4.0)]
    nxt_toks = _segment(tok, 0.0, "three", 4.0)
    lone = _segment(tok, 0.0, "one", 10.0) + [_ts(tok, 10.5)]     # W's own last utterance continues
    assert run_on_label(tok, [_member("a", 0.0, 12.0)], lone, nxt, nxt_toks) is None
    full = [_member("a", 0.0, 29.0)]                                # 0.5 s of W' would fit
    assert run_on_label(tok, full, _segment(tok, 0.0, "one", 29.0), nxt, nxt_toks) is None


def test_run_on_rows(assets):
    from dwjax.data.loader import LabelEncoder, TrainBatches, run_on_windows
    tok = assets["tok"]
    s = _packed_set(assets)
    before = copy.deepcopy(s)
    assert run_on_windows(s, 0.0, 0, tok) == 0 and s.tokens == before.tokens
    first, second, other = (s.ids.index(k) for k in ("c0+2", "c2+2", "c4+1"))
    assert run_on_windows(s, 1.0, 0, tok) == 1                      # only c0+2 has a next window
    assert s.run_on[first] == "c2+2" and s.run_on[second] is None and s.run_on[other] is None
    assert s.key(first) == "tiny/c0+2>c2+2" and s.key(second) == "tiny/c2+2"
    # the flite clips are short: all of c2+2 fits, its tokens moved by c0+2's length plus the gap
    offset = before.members[first][-1]["offset_s"] + before.members[first][-1]["duration_s"] + 0.5
    shift = int(round(offset / 0.02))
    moved = [t + shift if t >= tok.timestamp_begin else t for t in before.tokens[second]]
    assert s.tokens[first] == before.tokens[first] + moved
    assert s.plain[first] == before.plain[first] and s.tokens[second] == before.tokens[second]
    assert s.speech_s[first] == pytest.approx(before.speech_s[first] + before.speech_s[second])
    # which rows run on depends only on (seed, key): the same call on a fresh copy picks the same
    again = copy.deepcopy(before)
    run_on_windows(again, 1.0, 0, tok)
    assert again.run_on == s.run_on
    # always with timestamps, even when the run draws none; the next window's prompt is the plain text
    enc = LabelEncoder(tok, 256, 0.0, prev_context_probability=1.0)
    batches = TrainBatches([s], enc, 2, seed=0, workers=1, label_bucket=16)
    try:
        out = batches.labels(0, [(0, first), (0, second)])
    finally:
        batches.close()
    learned = out["labels"][0][out["loss_mask"][0] == 1].tolist()
    assert learned == s.tokens[first] + [tok.eot]
    n = int(out["n_prompt"][1])
    assert out["decoder_input_ids"][1, 1: 1 + len(s.plain[first])].tolist() == s.plain[first]
    assert n == 1 + len(s.plain[first]) + len(tok.sot_sequence(None, None, False))


def test_run_on_audio_is_cut_at_30_s(assets):
    from dwjax.audio import N_SAMPLES, load_audio
    from dwjax.data.loader import LabelEncoder, TrainBatches, run_on_windows
    tok = assets["tok"]
    s = _packed_set(assets)
    first, second = s.ids.index("c0+2"), s.ids.index("c2+2")
    # move c0+2's members (and its timestamps) later, so that 30 s falls in the middle of c2+2's second clip
    c2, c3 = (m["duration_s"] for m in s.members[second])
    end = s.members[first][-1]["offset_s"] + s.members[first][-1]["duration_s"]
    steps = int(round((29.0 - c2 - c3 / 2 - end) / 0.02))
    s.members[first] = [{**m, "offset_s": m["offset_s"] + steps * 0.02} for m in s.members[first]]
    s.tokens[first] = [t + steps if t >= tok.timestamp_begin else t for t in s.tokens[first]]
    own = list(s.tokens[first])
    assert run_on_windows(s, 1.0, 0, tok) == 1
    mem = s.members[first]
    assert [m["id"] for m in mem[2:]] == ["c2", "c3"]
    assert mem[-1]["offset_s"] < 30.0 < mem[-1]["offset_s"] + mem[-1]["duration_s"]
    # c2's segment whole, then c3's start alone
    rest = s.tokens[first][len(own):]
    assert rest[:-1] == [t + s.tokens[first][len(own)] - s.tokens[second][0] if t >= tok.timestamp_begin else t
                         for t in s.tokens[second][: len(rest) - 1]]
    assert rest[-2] >= tok.timestamp_begin and abs(rest[-1] - _ts(tok, mem[-1]["offset_s"])) <= 1
    batches = TrainBatches([s], LabelEncoder(tok, 256, 0.0), 1, seed=0, workers=1)
    try:
        audio, speech = batches._audio(0, first)
    finally:
        batches.close()
    assert audio.shape == (N_SAMPLES,)
    expect = np.zeros(N_SAMPLES, np.float32)
    for m in mem:
        a = load_audio(m["audio"])
        start = int(round(m["offset_s"] * 16000))
        n = min(len(a), N_SAMPLES - start)
        expect[start: start + n] = a[:n]
    np.testing.assert_array_equal(audio, expect)
    assert speech == pytest.approx(sum(min(m["duration_s"], 30.0 - m["offset_s"]) for m in mem), abs=1e-6)
