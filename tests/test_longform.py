"""Long-form: chunk spans, the overlap merge (property tests), timestamp offsets, the chunked pipeline on a fake
transcriber, and (slow) a >= 3-minute recording with builtin tiny.en."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dwjax.audio import SAMPLE_RATE
from dwjax.decoding.longform import (accumulate_timestamps, best_overlap, chunk_spans, merge_sequences,
                                     offset_timestamps, segments_from_tokens, transcribe_long)

unique_lists = st.lists(st.integers(0, 10_000), unique=True)


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_overlap_found(data):
    tokens = data.draw(st.lists(st.integers(0, 10_000), unique=True, min_size=4, max_size=60))
    cut = data.draw(st.integers(2, len(tokens) - 2))
    m = data.draw(st.integers(2, min(cut, len(tokens) - cut, 20)))
    a, b = tokens[:cut], tokens[cut - m:]               # b starts with the last m tokens of a
    assert merge_sequences([a, b]) == tokens


@given(unique_lists.filter(lambda x: len(x) >= 2), st.data())
@settings(max_examples=200, deadline=None)
def test_no_match_concatenates(tokens, data):
    cut = data.draw(st.integers(0, len(tokens)))
    a, b = tokens[:cut], tokens[cut:]
    assert merge_sequences([a, b]) == a + b
    # a single shared token is not enough to align
    if a and b:
        assert merge_sequences([a, [a[-1]] + b]) == a + [a[-1]] + b


@given(st.lists(st.integers(0, 3), min_size=2, max_size=12), unique_lists.filter(lambda x: len(x) <= 30),
       st.data())
@settings(max_examples=200, deadline=None)
def test_repeated_tails_not_duplicated(repeat, rest, data):
    rest = [t + 100 for t in rest]                       # disjoint from the repeated part
    cut = data.draw(st.integers(0, len(rest)))
    x, y = rest[:cut], rest[cut:]
    assert merge_sequences([x + repeat, repeat + y]) == x + repeat + y


@given(st.lists(unique_lists.filter(lambda x: 6 <= len(x) <= 40), min_size=1, max_size=5), st.data())
@settings(max_examples=100, deadline=None)
def test_many_chunks(parts, data):
    # a unique token stream cut into chunks that overlap by 2..5 tokens merges back to the stream
    stream = list(dict.fromkeys(t for p in parts for t in p))
    if len(stream) < 12:
        return
    bounds, pos, chunks = [], 0, []
    while pos < len(stream):
        end = min(len(stream), pos + data.draw(st.integers(6, 12)))
        chunks.append(stream[pos:end])
        if end == len(stream):
            break
        pos = end - data.draw(st.integers(2, 5))
    assert merge_sequences(chunks) == stream


def test_best_overlap_scores_and_middle_cut():
    # exact overlap of 4 beats a partial overlap; cut at the middle of the matched span
    assert best_overlap([1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7]) == (2, 6, 0, 4)
    assert merge_sequences([[1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7]]) == [1, 2, 3, 4, 5, 6, 7]
    # a noisy overlap (one substitution) still aligns: left keeps its half, right its half
    assert merge_sequences([[1, 2, 3, 4, 5, 6], [3, 4, 9, 6, 7, 8]]) == [1, 2, 3, 4, 9, 6, 7, 8]
    assert merge_sequences([]) == [] and merge_sequences([[1, 2]]) == [1, 2]
    assert merge_sequences([[], [1, 2]]) == [1, 2] and merge_sequences([[1, 2], []]) == [1, 2]


@given(st.integers(1, 200_000), st.integers(1_000, 60_000), st.data())
@settings(max_examples=300, deadline=None)
def test_chunk_spans(n, chunk_len, data):
    stride = data.draw(st.integers(0, (chunk_len - 1) // 2))
    chunks = chunk_spans(n, chunk_len, stride, stride)
    step = chunk_len - 2 * stride
    assert chunks, (n, chunk_len, stride)
    assert chunks[0].start == 0 and chunks[0].stride_left == 0
    assert chunks[-1].end == n and chunks[-1].stride_right == 0
    for i, c in enumerate(chunks):
        assert c.start == i * step and c.end == min(n, c.start + chunk_len)
        assert c.end - c.start > c.stride_left               # never a chunk that is only left stride
        if i:
            assert c.stride_left == stride
        if i < len(chunks) - 1:
            assert c.stride_right == stride and c.end < n
    assert all(c.end < n for c in chunks[:-1])               # stop at the first chunk that reaches the end


def test_chunk_span_edge_cases():
    # 30 s chunks, 5 s strides: step 20 s
    sr = SAMPLE_RATE
    spans = chunk_spans(70 * sr, 30 * sr, 5 * sr, 5 * sr)
    assert [(c.start // sr, c.end // sr, c.stride_left // sr, c.stride_right // sr) for c in spans] == [
        (0, 30, 0, 5), (20, 50, 5, 5), (40, 70, 5, 0)]
    assert spans[1].time_offset == 15.0
    # the next chunk would hold only its left stride (a tail of <= 5 s after a chunk ending 3 s early): skipped
    spans = chunk_spans(63 * sr, 30 * sr, 5 * sr, 5 * sr)
    assert [(c.start // sr, c.end // sr) for c in spans] == [(0, 30), (20, 50), (40, 63)]
    spans = chunk_spans(20 * sr + 100, 30 * sr, 5 * sr, 5 * sr)
    assert len(spans) == 1 and spans[0].end == 20 * sr + 100
    assert chunk_spans(45 * sr, 30 * sr, 5 * sr, 5 * sr)[-1].end == 45 * sr


def test_timestamp_offsets_and_accumulation():
    tb = 1000
    assert offset_timestamps([tb, 5, tb + 50, tb + 50, 6, tb + 100], tb, 15.0) == \
        [tb + 750, 5, tb + 800, tb + 800, 6, tb + 850]
    assert accumulate_timestamps([tb + 10, 1, tb + 5, 2, tb + 20], tb) == [tb + 10, 1, tb + 10, 2, tb + 20]
    decode = lambda ids: " ".join(map(str, ids))
    segs = segments_from_tokens([tb + 1600, 7, 8, tb + 1700, tb + 1700, 9, tb + 1750, 10], tb, 999, decode, 40.0)
    assert segs == [{"start": 32.0, "end": 34.0, "text": "7 8"}, {"start": 34.0, "end": 35.0, "text": "9"},
                    {"start": 35.0, "end": 40.0, "text": "10"}]


class FakeTokenizer:
    eot, timestamp_begin, sot = 50_000, 50_001, 50_002
    is_multilingual = False

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids if i < self.eot)


class FakeTranscriber:
    """'Transcribes' audio whose samples hold word ids (one word per 0.4 s): the words it hears, with timestamps
    relative to the chunk."""
    def __init__(self, batch_size=3):
        self.tokenizer, self.batch_size, self.calls = FakeTokenizer(), batch_size, []
        self.cfg = SimpleNamespace(decoder_layers=4)

    def transcribe_batch(self, audios, timestamps=False, **kw):
        self.calls.append(len(audios))
        assert len(audios) <= self.batch_size
        out = []
        for a in audios:
            assert len(a) <= 30 * SAMPLE_RATE
            words = list(dict.fromkeys(int(v) for v in a))
            ids = []
            for w in words:
                if timestamps:
                    first = int(np.argmax(a == w)) / SAMPLE_RATE
                    ids += [self.tokenizer.timestamp_begin + int(round(first / 0.02))]
                ids.append(w)
            out.append(SimpleNamespace(tokens=ids, language=None, avg_logprob=-0.1, no_speech_prob=0.0))
        return out


@pytest.mark.parametrize("seconds", [31.0, 64.3, 185.0])
def test_chunked_pipeline_recovers_every_word_once(seconds):
    n_words = int(seconds / 0.4) + 1
    audio = np.repeat(np.arange(1, n_words + 1, dtype=np.float32), int(0.4 * SAMPLE_RATE))[: int(seconds * SAMPLE_RATE)]
    fake = FakeTranscriber()
    t = transcribe_long(fake, audio, chunk_length=15)
    expected = list(dict.fromkeys(int(v) for v in audio))
    assert t.tokens == expected
    assert sum(fake.calls) == len(chunk_spans(len(audio), 15 * SAMPLE_RATE, int(2.5 * SAMPLE_RATE),
                                              int(2.5 * SAMPLE_RATE)))
    # with timestamps: segments' starts are absolute and non-decreasing
    t = transcribe_long(fake, audio, chunk_length=15, timestamps=True)
    assert [int(s["text"][1:]) for s in t.segments] == expected[:-1] or \
        [int(s["text"][1:]) for s in t.segments] == expected
    starts = [s["start"] for s in t.segments]
    assert starts == sorted(starts)
    for s in t.segments[:20]:
        assert abs(s["start"] - (int(s["text"][1:]) - 1) * 0.4) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# real model, >= 3 minutes
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_case():
    from dwjax.decoding.transcribe import Transcriber
    from dwjax.text.wer import wer
    from tests.helpers import long_recording
    clips, audio = long_recording()
    assert len(audio) >= 180 * SAMPLE_RATE
    tr = Transcriber("builtin:whisper-tiny.en", batch_size=8)
    refs = [t for t, _ in clips]
    short = [r.text for r in tr.transcribe([a for _, a in clips])]
    ref_all = " ".join(refs)
    return tr, audio, ref_all, wer([ref_all], [" ".join(short)])


@pytest.mark.slow
def test_long_recording_chunked_wer_close_to_short_form(long_case):
    from dwjax.text.normalizer import normalize_english
    from dwjax.text.wer import repeated_ngrams, wer
    tr, audio, ref_all, short_wer = long_case
    for kw in (dict(), dict(timestamps=True)):
        long_ = transcribe_long(tr, audio, **kw)
        long_wer = wer([ref_all], [long_.text])
        print(f"{kw}: short-form WER {100 * short_wer:.2f}  chunked WER {100 * long_wer:.2f}")
        assert abs(100 * long_wer - 100 * short_wer) <= 1.0
        # no duplicated tails at chunk edges: no repeated 5-gram that the reference does not repeat
        assert repeated_ngrams(normalize_english(long_.text)) <= repeated_ngrams(normalize_english(ref_all))
    starts = [s["start"] for s in long_.segments]
    assert starts == sorted(starts) and 150 < starts[-1] < len(audio) / SAMPLE_RATE


@pytest.mark.slow
def test_long_recording_sequential(long_case):
    from dwjax.text.wer import wer
    tr, audio, ref_all, short_wer = long_case
    t = transcribe_long(tr, audio, method="sequential")
    seq_wer = wer([ref_all], [t.text])
    print(f"sequential WER {100 * seq_wer:.2f} (short-form {100 * short_wer:.2f})")
    assert seq_wer <= short_wer + 0.03
    starts = [s["start"] for s in t.segments]
    assert starts == sorted(starts) and starts[-1] > 150


# ---------------------------------------------------------------------------------------------------------------
# sequential: the temperature fallback's choice (fake windows) and a ~50 s recording with builtin tiny.en
# ---------------------------------------------------------------------------------------------------------------


class _SeqTokenizer(FakeTokenizer):
    sot_prev = 50_003


def test_sequential_fallback_keeps_best_result_not_last(monkeypatch):
    """Genuinely repeated speech fails the compression test at every temperature; the kept result must be the most
    probable one (here the greedy one), not the last, highest-temperature sample."""
    import dwjax.decoding.longform as lf
    tok = _SeqTokenizer()
    tb = tok.timestamp_begin
    repeated = [tb] + [1, 2, 3, 4] * 30 + [tb + 1400, tb + 1400]          # compression ratio well above 2.4
    garbage = [tb, 7, 8, 9, tb + 200]                                     # poor log-probability, low ratio
    calls = []

    def fake_window(transcriber, window, prompt, sot_index, temperature, max_new_tokens, seed, best_of=1):
        calls.append(temperature)
        if temperature == 1.0:
            return garbage, -3.3, 0.1
        return repeated, -0.2 - temperature / 10, 0.1

    monkeypatch.setattr(lf, "_generate_window", fake_window)
    fake = SimpleNamespace(tokenizer=tok, prompt=lambda lang, task, ts: [tok.sot])
    audio = np.zeros(40 * SAMPLE_RATE, np.float32)
    t = transcribe_long(fake, audio, method="sequential", timestamps=True)
    assert calls[:6] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert "w7" not in t.text and t.text.startswith("w1 w2 w3 w4")
    # the window advanced to the last timestamp pair (28 s); the second window starts there
    assert t.segments[0]["start"] == 0.0 and t.segments[0]["end"] == 28.0
    assert t.segments[1]["start"] == 28.0


def test_sequential_recording_matches_chunked_and_short_form(tmp_path):
    """~50 s of different synthesised sentences: sequential WER close to chunked and short-form, and the windows
    cover the whole recording (segment ends non-decreasing, the last near the end)."""
    from dwjax.decoding.transcribe import Transcriber
    from dwjax.text.wer import wer
    from tests.helpers import synthesize
    clips = synthesize(tmp_path, 14)
    pause = np.zeros(int(0.4 * SAMPLE_RATE), np.float32)
    audio = np.concatenate([np.concatenate([a, pause]) for _, a in clips])
    duration = len(audio) / SAMPLE_RATE
    assert 40 <= duration <= 60, duration
    ref = " ".join(t for t, _ in clips)
    tr = Transcriber("builtin:whisper-tiny.en", batch_size=4)
    # short-form with timestamps: the same compiled bucket as the chunked decode (which predicts timestamps)
    short = tr.transcribe([a for _, a in clips], timestamps=True)
    short_wer = 100 * wer([ref], [" ".join(r.text for r in short)])
    chunked_wer = 100 * wer([ref], [transcribe_long(tr, audio).text])
    seq = transcribe_long(tr, audio, method="sequential", timestamps=True)
    seq_wer = 100 * wer([ref], [seq.text])
    print(f"{duration:.1f} s: WER short-form {short_wer:.2f}  chunked {chunked_wer:.2f}  sequential {seq_wer:.2f}")
    assert seq_wer <= 30
    assert abs(seq_wer - chunked_wer) <= 10 and abs(seq_wer - short_wer) <= 10
    ends = [s["end"] for s in seq.segments]
    starts = [s["start"] for s in seq.segments]
    assert ends == sorted(ends) and starts == sorted(starts)
    assert all(s["start"] <= s["end"] for s in seq.segments)
    assert duration - 3.0 <= ends[-1] <= duration + 0.5, (ends[-1], duration)
