"""The label filters of `dwjax distill` (dwjax/data/label_filter.py) against hand-computed values.

Rows are written straight to a parquet file with dwjax.pseudo_label.SCHEMA (no model). The rule under test:
a label with a reference (`wer` not null) is judged by the WER filter alone; one without by the teacher's
confidence: kept iff avg_logprob >= min_avg_logprob AND compression_ratio <= max_compression_ratio AND
no_speech_prob <= max_no_speech_prob. Every bound is INCLUSIVE: a value exactly at its threshold is kept, the
nearest value beyond it (1e-7 past) is dropped. Defaults: WER 10 %, avg_logprob -1.0, compression 2.4,
no-speech 0.6. Each dropped row is counted once, under the first reason in label_filter.REASONS.
"""
from __future__ import annotations

import math
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dwjax import config as C
from dwjax.data.label_filter import REASONS, LabelFilter, format_counts, judge
from dwjax.data.loader import read_labelled
from dwjax.errors import ConfigError, UserError
from dwjax.pseudo_label import SCHEMA
from dwjax.pseudo_label.rows import compression_ratio, row_wer

GOOD = dict(avg_logprob=-0.3, compression_ratio=1.5, no_speech_prob=0.1)
BAD = dict(avg_logprob=-3.0, compression_ratio=3.0, no_speech_prob=0.9)


def ref(id, wer, conf=GOOD, **kw):
    return {**dict(id=id, audio=f"/a/{id}.flac", text="a label", token_ids=[1, 2, 3], reference="a reference",
                   wer=wer, status="ok"), **conf, **kw}


def noref(id, reference=None, **kw):
    return {**dict(id=id, audio=f"/a/{id}.flac", text="a label", token_ids=[1, 2, 3], reference=reference, wer=None,
                   status="ok"), **GOOD, **kw}


ROWS = [
    # with a reference: WER alone decides (wer is a fraction, the threshold 10 is in %)
    ref("r_wer_0", 0.0),                                   # kept
    ref("r_wer_at", 1 / 10),                               # kept: exactly 10 % (1 error in 10 words)
    ref("r_wer_below", 0.0999),                            # kept
    ref("r_wer_above", 0.1000001),                         # dropped_wer
    ref("r_wer_2of19", 2 / 19),                            # dropped_wer (10.53 %)
    ref("r_wer_bad_conf", 0.05, BAD),                      # kept: confidence is not asked when there is a reference
    ref("r_wer_high_good_conf", 0.5),                      # dropped_wer: good confidence does not rescue it
    # without a reference: the teacher's confidence
    noref("n_good"),                                       # kept
    noref("n_empty_ref", reference=""),                    # kept: an empty reference is no reference
    noref("n_lp_at", avg_logprob=-1.0),                    # kept (inclusive)
    noref("n_lp_below", avg_logprob=-1.0000001),           # dropped_avg_logprob
    noref("n_cr_at", compression_ratio=2.4),               # kept (inclusive)
    noref("n_cr_above", compression_ratio=2.4000001),      # dropped_compression_ratio
    noref("n_nsp_at", no_speech_prob=0.6),                 # kept (inclusive)
    noref("n_nsp_above", no_speech_prob=0.6000001),        # dropped_no_speech
    noref("n_all_bad", **BAD),                             # dropped_avg_logprob (the first failing condition)
    noref("n_cr_and_nsp", compression_ratio=3.0, no_speech_prob=0.9),   # dropped_compression_ratio
    noref("n_no_scores", avg_logprob=None, compression_ratio=None, no_speech_prob=None),  # dropped_no_scores
    noref("n_nan", avg_logprob=float("nan")),              # dropped_no_scores
    noref("n_long", token_ids=list(range(444))),           # dropped_long: 444 + 5 > 448
    noref("n_long_fits", token_ids=list(range(443))),      # kept: 443 + 5 = 448
    # not labels
    dict(id="f_missing", audio="/a/missing.flac", status="missing audio: no such file", reference="x"),
    dict(id="f_silent", audio="/a/silent.flac", status="no speech: peak below 1e-4", **BAD),
]
KEPT_DEFAULT = ["n_cr_at", "n_empty_ref", "n_good", "n_long_fits", "n_lp_at", "n_nsp_at",
                "r_wer_0", "r_wer_at", "r_wer_bad_conf", "r_wer_below"]
COUNTS_DEFAULT = dict(total=23, ok=21, with_reference=7, without_reference=14, kept=10, unfiltered=0,
                      dropped_status=2, dropped_wer=3, dropped_no_scores=2, dropped_avg_logprob=2,
                      dropped_compression_ratio=2, dropped_no_speech=1, dropped_long=1)


@pytest.fixture
def labels(tmp_path):
    path = tmp_path / "labels"
    path.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS, schema=SCHEMA), path / "labels-00000-of-00001-part00000.parquet")
    return str(path)


def _check_sum(c):
    assert c["total"] == c["kept"] + sum(c[r] for r in REASONS)
    assert c["ok"] == c["with_reference"] + c["without_reference"] == c["total"] - c["dropped_status"]


def test_default_filters_keep_exactly_the_hand_picked_rows(labels):
    s, c = read_labelled("mix", labels, LabelFilter())
    assert sorted(s.ids) == KEPT_DEFAULT
    assert c == COUNTS_DEFAULT
    _check_sum(c)
    # a float is a WER threshold with the default confidence filter (the old call form)
    s2, c2 = read_labelled("mix", labels, 10.0)
    assert s2.ids == s.ids and c2 == c


def test_wer_filter_off_keeps_every_referenced_label(labels):
    s, c = read_labelled("mix", labels, LabelFilter(wer_threshold=None))
    assert sorted(i for i in s.ids if i.startswith("r_")) == sorted(r["id"] for r in ROWS if r["id"][:2] == "r_")
    assert c["dropped_wer"] == 0 and c["unfiltered"] == 7 and c["kept"] == 13
    assert {k: c[k] for k in ("dropped_avg_logprob", "dropped_compression_ratio", "dropped_no_speech")} == \
        {"dropped_avg_logprob": 2, "dropped_compression_ratio": 2, "dropped_no_speech": 1}
    _check_sum(c)


def test_confidence_filter_off_keeps_unreferenced_labels_unjudged(labels):
    off = LabelFilter(min_avg_logprob=None, max_compression_ratio=None, max_no_speech_prob=None)
    s, c = read_labelled("mix", labels, off)
    noref_ids = sorted(r["id"] for r in ROWS if r["id"][:2] == "n_" and r["id"] != "n_long")
    assert sorted(i for i in s.ids if i.startswith("n_")) == noref_ids
    assert c["unfiltered"] == 14 and c["kept"] == 17 and c["dropped_long"] == 1 and c["dropped_wer"] == 3
    assert c["dropped_no_scores"] == c["dropped_avg_logprob"] == 0
    _check_sum(c)
    # +-inf is off as well (how one data.train entry turns a global threshold off)
    inf = LabelFilter(min_avg_logprob=-math.inf, max_compression_ratio=math.inf, max_no_speech_prob=math.inf)
    assert read_labelled("mix", labels, inf)[1] == c


def test_one_condition_off_and_moved_thresholds(labels):
    s, c = read_labelled("mix", labels, LabelFilter(max_compression_ratio=None))
    # n_cr_above is kept now; n_cr_and_nsp fails on no-speech next; n_all_bad still on avg_logprob
    assert "n_cr_above" in s.ids and "n_cr_and_nsp" not in s.ids
    assert (c["dropped_compression_ratio"], c["dropped_no_speech"], c["dropped_avg_logprob"]) == (0, 2, 2)
    # avg_logprob threshold moved to -3.0: n_lp_below and n_all_bad (exactly -3.0, inclusive) pass it;
    # n_all_bad then fails on compression ratio 3.0 > 2.4
    s, c = read_labelled("mix", labels, LabelFilter(min_avg_logprob=-3.0))
    assert "n_lp_below" in s.ids and "n_all_bad" not in s.ids
    assert (c["dropped_avg_logprob"], c["dropped_compression_ratio"]) == (0, 3)
    # a label without a score its filter needs cannot be judged; a score of a condition that is off is not needed
    assert judge(noref("x", avg_logprob=None), LabelFilter()) == "dropped_no_scores"
    assert judge(noref("x", avg_logprob=None), LabelFilter(min_avg_logprob=None)) is None
    assert judge(noref("x", avg_logprob=None),
                 LabelFilter(max_compression_ratio=None, max_no_speech_prob=None)) == "dropped_no_scores"


def test_wer_at_threshold_from_a_real_score_is_kept():
    """1 substitution in 10 words is a WER of exactly 10 %: kept at wer_threshold 10 (0.1 * 100 would be a float
    above 10 for other fractions, e.g. 0.07 * 100 = 7.000000000000001; the filter compares wer > threshold / 100)."""
    wer = row_wer("the cat sat on the mat by the old door", "the cat sat on the hat by the old door")
    assert wer == 0.1
    assert judge(ref("x", wer), LabelFilter(wer_threshold=10.0)) is None
    assert judge(ref("x", 0.07), LabelFilter(wer_threshold=7.0)) is None      # 7.000000000000001 > 7.0 otherwise
    assert judge(ref("x", 0.0701), LabelFilter(wer_threshold=7.0)) == "dropped_wer"


def test_compression_ratio_catches_a_runaway_repeat():
    """compression_ratio = len(utf-8 bytes) / len(zlib.compress(bytes)) (Whisper's). A repeated phrase of 210
    bytes compresses to ~32 bytes (ratio ~6.6 > 2.4): dropped; a normal sentence barely compresses (~1.0): kept."""
    repeat = "you have done right, " * 10
    sentence = "The quick brown fox jumps over the lazy dog near the river bank."
    rb, sb = repeat.encode("utf-8"), sentence.encode("utf-8")
    assert (len(rb), len(sb)) == (210, 64)                                    # 21 bytes x 10; counted by hand
    assert compression_ratio(repeat) == len(rb) / len(zlib.compress(rb))
    assert compression_ratio(sentence) == len(sb) / len(zlib.compress(sb))
    assert compression_ratio(repeat) > 5.0 > 2.4 > 1.2 > compression_ratio(sentence)
    assert compression_ratio("") == 0.0
    rule = LabelFilter()
    assert judge(noref("rep", text=repeat, compression_ratio=compression_ratio(repeat)), rule) == \
        "dropped_compression_ratio"
    assert judge(noref("ok", text=sentence, compression_ratio=compression_ratio(sentence)), rule) is None


def test_counts_line():
    c = dict(COUNTS_DEFAULT)
    assert format_counts("mix", c, LabelFilter()) == (
        "data mix: 10/23 kept; 7 with reference: 3 WER > 10%; 14 without reference: 2 avg_logprob < -1, "
        "2 compression_ratio > 2.4, 1 no_speech_prob > 0.6, 2 without scores; 1 too long, 2 not labelled")
    off = LabelFilter(wer_threshold=None, min_avg_logprob=None, max_compression_ratio=None, max_no_speech_prob=None)
    assert format_counts("mix", c, off) == ("data mix: 10/23 kept; 7 with reference: WER filter off; "
                                            "14 without reference: confidence filter off; 1 too long, "
                                            "2 not labelled")


def test_nothing_left_names_the_counts(tmp_path):
    p = tmp_path / "l.parquet"
    pq.write_table(pa.Table.from_pylist([noref("a", avg_logprob=-5.0)], schema=SCHEMA), p)
    with pytest.raises(UserError, match="no training examples left after the label filters .*1 avg_logprob < -1"):
        read_labelled("one", str(p))


def test_config_keys_defaults_and_per_set_overrides():
    d = C.Config().data
    assert (d.wer_threshold, d.min_avg_logprob, d.max_compression_ratio, d.max_no_speech_prob) == (10.0, -1.0, 2.4, 0.6)
    assert LabelFilter.for_set(d) == LabelFilter()
    cfg = C.load_config(overrides=[
        "data.max_compression_ratio=null",
        "data.train=[{name: a, path: p, min_avg_logprob: -2.0, wer_threshold: 20},"
        " {name: b, path: q, max_no_speech_prob: .inf}, {name: c, path: r}]"])
    a, b, c = cfg.data.train
    assert LabelFilter.for_set(cfg.data, a) == LabelFilter(20.0, -2.0, None, 0.6)
    assert LabelFilter.for_set(cfg.data, b) == LabelFilter(10.0, -1.0, None, math.inf)
    assert LabelFilter.for_set(cfg.data, c) == LabelFilter(10.0, -1.0, None, 0.6)
    assert C.load_config(config=None, overrides=["data.wer_threshold=null"]).data.wer_threshold is None
    # round trip through YAML (inf included)
    assert C.from_dict(C.to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, message", [
    ("data.min_avg_logprob=0.5", r"data min_avg_logprob must be <= 0"),
    ("data.max_no_speech_prob=-0.1", r"data max_no_speech_prob must be >= 0"),
    ("data.wer_threshold=-1", r"data wer_threshold must be >= 0"),
    ("data.train=[{name: s1, path: p, max_compression_ratio: 0}]", r"data.train s1 max_compression_ratio must be > 0"),
    ("data.min_avg_logprob=abc", r"data.min_avg_logprob .*could not be converted to Float"),
])
def test_bad_thresholds_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        C.load_config(overrides=[override])
