"""Per-language scoring (issue 14): which normaliser and metric each language gets, the character error rate
against jiwer's cer, WER with OpenAI's basic normaliser against jiwer's wer, script checks and language checks
against the builtin teachers' vocabularies. Hand-made examples; the expected values are computed by hand or by
jiwer on text normalised here."""
from __future__ import annotations

import jiwer
import pytest

from dwjax.errors import ConfigError
from dwjax.text.languages import check_language, metric, normalizer, score, script_problem
from dwjax.text.normalizer import normalize_basic, normalize_english
from dwjax.text.wer import char_error_rates


def test_metric_and_normaliser_per_language():
    for code in ("zh", "ja", "th", "lo", "my", "km", "yue", "japanese", "Burmese"):
        assert metric(code) == "cer", code
    for code in ("en", "de", "fr", "es", "ko", "ru", "hi", None):
        assert metric(code) == "wer", code
    assert normalizer("en") is normalize_english and normalizer(None) is normalize_english
    assert normalizer("de") is normalize_basic and normalizer("ja") is normalize_basic
    with pytest.raises(ConfigError, match="unknown language 'xx'"):
        metric("xx")


def test_cer_equals_jiwer_on_hand_made_japanese_and_chinese():
    refs = ["今日は晴れです", "東京へ行きます", "我喜欢喝茶"]
    hyps = ["今日は雨です", "東京に行きました", "我喜欢喝咖啡"]
    out = score("ja", refs, hyps)
    assert out["metric"] == "cer"
    assert out["rate"] == pytest.approx(jiwer.cer(refs, hyps))
    # by hand: 晴れ -> 雨 (1 substitution + 1 deletion); へ -> に, す -> し, + た, + (1 insertion: ました vs ます);
    # 茶 -> 咖 + 啡 inserted
    s, d, i = out["substitutions"], out["deletions"], out["insertions"]
    assert (s + d + i, out["n_ref_chars"]) == (2 + 3 + 2, 7 + 7 + 5)
    assert out["rate"] == pytest.approx(7 / 19)


def test_cer_ignores_punctuation_and_whitespace_only():
    # the basic normaliser turns punctuation into spaces; CER then drops all whitespace
    refs = ["今日は、晴れです。", "สวัสดี ครับ"]
    hyps = ["今日は 晴れです", "สวัสดีครับ"]
    got = char_error_rates(refs, hyps, normalize_basic)
    assert got["cer"] == 0.0
    # one changed character among the same strings
    got = score("ja", ["今日は、晴れです。"], ["今日は、曇れです。"])
    assert got["rate"] == pytest.approx(jiwer.cer("今日は晴れです", "今日は曇れです")) == pytest.approx(1 / 7)


def test_cer_empty_references_are_counted_apart():
    got = char_error_rates(["。", "ねこ"], ["あ", "ねこ"], normalize_basic)
    assert (got["n_pairs"], got["n_empty_refs"], got["empty_ref_hyp_chars"], got["cer"]) == (1, 1, 1, 0.0)


def test_basic_normaliser_wer_for_german_french_spanish_equals_jiwer():
    cases = {
        "de": (["Über den Fluß, bitte!", "Der Zug fährt um acht Uhr ab."],
               ["über den fluss bitte", "Der Zug fährt um 8 Uhr ab"]),
        "fr": (["Peux-tu me passer le sel, s'il te plaît ?"], ["peux tu me passer le sel s'il te plait"]),
        "es": (["¿Me pasas la sal, por favor?"], ["Me pasas la sal por favor."]),
    }
    for language, (refs, hyps) in cases.items():
        out = score(language, refs, hyps)
        assert out["metric"] == "wer"
        expected = jiwer.wer([" ".join(normalize_basic(r).split()) for r in refs],
                             [" ".join(normalize_basic(h).split()) for h in hyps])
        assert out["rate"] == pytest.approx(expected), language
    # by hand: de: fluß/fluss and acht/8 are 2 substitutions in 4 + 7 words; diacritics are kept (plait vs plaît:
    # 1 of 10 words; "peux-tu" is two words, "s'il" becomes "s il"); es: punctuation only, no error
    assert score("de", *cases["de"])["rate"] == pytest.approx(2 / 11)
    assert score("fr", *cases["fr"])["rate"] == pytest.approx(1 / 10)
    assert score("es", *cases["es"])["rate"] == 0.0


def test_english_keeps_the_english_normaliser():
    out = score("en", ["Mr. Smith paid twenty five dollars."], ["mister smith paid $25"])
    assert out["rate"] == 0.0 and out["metric"] == "wer"
    # the basic normaliser would count all three differences
    assert score("de", ["Mr. Smith paid twenty five dollars."], ["mister smith paid $25"])["rate"] > 0.5


def test_script_problems():
    assert script_problem("Guten Morgen, wie geht es dir?", "de") is None
    assert script_problem("私はiPhoneを買いました", "ja") is None          # Latin names inside Japanese
    assert script_problem("Привет, как дела?", "ru") is None
    assert script_problem("1, 2, 3!", "ja") is None                       # no letters: nothing to judge
    msg = script_problem("こんにちは世界", "de")
    assert msg.startswith("mixed scripts: 7 of its 7 letters") and "Latin" in msg
    assert "Hiragana" in script_problem("Hallo こんにちは", "de")
    assert "none of its 10 letters" in script_problem("hello world", "ja")
    assert script_problem("Hallo Привет мир", "de").startswith("mixed scripts: 9 of its 14 letters")


@pytest.fixture(scope="module")
def tokenizers():
    from dwjax.weights.loading import load_model
    return {name: load_model(f"builtin:whisper-{name}").tokenizer for name in ("tiny.en", "base")}


def test_check_language(tokenizers):
    base, en = tokenizers["base"], tokenizers["tiny.en"]
    assert check_language("German", base) == "de" and check_language("fr", base, "m") == "fr"
    assert check_language("en", en) == "en"
    with pytest.raises(ConfigError, match=r"unknown language 'xx'"):
        check_language("xx", base)
    with pytest.raises(ConfigError, match=r"does not support language 'yue' \(Cantonese\).*99 languages"):
        check_language("yue", base, "builtin:whisper-base")
    with pytest.raises(ConfigError, match=r"tiny.en is English-only; it cannot handle language 'de' \(German\)"):
        check_language("de", en, "builtin:whisper-tiny.en")
    for call in (lambda: check_language("xx", base), lambda: check_language("de", en, "m")):
        with pytest.raises(ConfigError) as e:
            call()
        assert "\n" not in str(e.value)                 # one line each
