"""Per-language scoring and checks: the one place that decides how a language's text is normalised and scored.

    LANGUAGES, resolve_language(name_or_code) -> OpenAI's language codes and names; a code from either
    metric(language)                   -> "wer" or "cer"
    normalizer(language)               -> the text normaliser scores of `language` use
    score(language, refs, hyps)        -> {"metric", "rate", "n_ref", ...} corpus rates of one language
    check_language(language, tokenizer, model) -> the Whisper code, or ConfigError (one line)
    script_problem(text, language)     -> None, or why `text` is not written in `language`'s script

Normalisers (OpenAI's, as the Whisper paper scores): English text goes through the English normaliser
(`normalize_english`); every other language through the basic normaliser (`normalize_basic`: lower case,
bracketed text dropped, symbols, punctuation *and combining marks* -> spaces, as OpenAI's does).

Metrics: word error rate, except for the languages written without spaces between words (NO_SPACE_LANGUAGES:
Chinese, Cantonese, Japanese, Thai, Lao, Burmese, Khmer, Tibetan), which are scored with the character error rate
(`dwjax.text.wer.char_error_rates`: basic-normalised, whitespace removed). A row's language is its manifest
`language` (or the one forced for the run); rows of unknown language are scored as English (the old behaviour).

Scripts: each language is written in one or more Unicode scripts (SCRIPTS; Latin for the languages not listed).
A reference whose letters are mostly in another script (a German row holding Japanese text, a Japanese row that
is all Latin letters) is a mislabelled row: `script_problem` says so in one line, and the pseudo-labeller and the
evaluation set such rows aside (named, not scored) instead of scoring a meaningless error rate.
"""
from __future__ import annotations

import unicodedata
from typing import Callable, Optional, Sequence

from dwjax.errors import ConfigError
from dwjax.text.normalizer import normalize_basic, normalize_english
from dwjax.text.wer import char_error_rates, error_rates

__all__ = ["LANGUAGES", "resolve_language", "NO_SPACE_LANGUAGES", "SCRIPTS", "metric", "normalizer", "score",
           "check_language", "script_problem", "language_name"]

# OpenAI's language codes, in token order (the first 99 are in every Whisper vocabulary; "yue"
# only in large-v3 and later), and their English names.
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian",
    "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer",
    "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
# other names people use for the same languages
_LANGUAGE_ALIASES: dict[str, str] = {
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
    "castilian": "es", "mandarin": "zh",
}


def resolve_language(language: str) -> str:
    """A Whisper language code from a code ("en") or a name ("English", "burmese")."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    for code, name in LANGUAGES.items():
        if name == key:
            return code
    if key in _LANGUAGE_ALIASES:
        return _LANGUAGE_ALIASES[key]
    raise ConfigError(f"unknown language {language!r}; use a Whisper language code such as 'en' or a name such as 'english'")


#: languages written without spaces between words: scored with the character error rate
NO_SPACE_LANGUAGES = frozenset({"zh", "yue", "ja", "th", "lo", "my", "km", "bo"})

#: the scripts (first word of the Unicode character name: LATIN, CYRILLIC, CJK, ...) each language is written in;
#: a language not listed is written in Latin
SCRIPTS: dict[str, frozenset[str]] = {
    **{c: frozenset({"CYRILLIC"}) for c in ("ru", "uk", "be", "bg", "mk", "kk", "tg", "mn", "ba", "tt")},
    "sr": frozenset({"CYRILLIC", "LATIN"}),
    "el": frozenset({"GREEK"}),
    **{c: frozenset({"ARABIC"}) for c in ("ar", "fa", "ur", "ps", "sd")},
    **{c: frozenset({"HEBREW"}) for c in ("he", "yi")},
    "zh": frozenset({"CJK"}), "yue": frozenset({"CJK"}),
    "ja": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL", "CJK"}),
    "th": frozenset({"THAI"}), "lo": frozenset({"LAO"}), "my": frozenset({"MYANMAR"}),
    "km": frozenset({"KHMER"}), "bo": frozenset({"TIBETAN"}),
    **{c: frozenset({"DEVANAGARI"}) for c in ("hi", "mr", "ne", "sa")},
    **{c: frozenset({"BENGALI"}) for c in ("bn", "as")},
    "ta": frozenset({"TAMIL"}), "te": frozenset({"TELUGU"}), "gu": frozenset({"GUJARATI"}),
    "pa": frozenset({"GURMUKHI"}), "kn": frozenset({"KANNADA"}), "ml": frozenset({"MALAYALAM"}),
    "si": frozenset({"SINHALA"}), "ka": frozenset({"GEORGIAN"}), "hy": frozenset({"ARMENIAN"}),
    "am": frozenset({"ETHIOPIC"}),
}
_LATIN = frozenset({"LATIN"})
#: a reference is refused when more than this fraction of its letters are in a script foreign to its language
#: (Latin letters are never foreign in a text of a non-Latin language: names and acronyms are written so)
MAX_FOREIGN_LETTERS = 0.2


def _code(language: Optional[str]) -> str:
    return "en" if not language else resolve_language(language)


def language_name(language: str) -> str:
    code = _code(language)
    return LANGUAGES.get(code, code).title()


def metric(language: Optional[str]) -> str:
    """"cer" for a language written without spaces (NO_SPACE_LANGUAGES), else "wer"; None counts as English."""
    return "cer" if _code(language) in NO_SPACE_LANGUAGES else "wer"


def normalizer(language: Optional[str]) -> Callable[[str], str]:
    """The English normaliser for English (and None), OpenAI's basic normaliser for every other language."""
    return normalize_english if _code(language) == "en" else normalize_basic


def score(language: Optional[str], references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus error rate of paired texts of one language, with its normaliser and metric.

    Returns the parts of `error_rates` / `char_error_rates` plus "metric" ("wer" / "cer"), "rate" (the error
    rate, NaN with no reference unit), "n_ref" (reference words or characters) and "language" (the code)."""
    code, kind = _code(language), metric(language)
    norm = normalizer(language)
    if kind == "cer":
        out = char_error_rates(references, hypotheses, norm)
        out.update(rate=out["cer"], n_ref=out["n_ref_chars"])
    else:
        out = error_rates(references, hypotheses, norm)
        out.update(rate=out["wer"], n_ref=out["n_ref_words"])
    out.update(metric=kind, language=code)
    return out


def check_language(language: str, tokenizer, model: str = "the model") -> str:
    """The Whisper code of `language` if `model` (its `tokenizer`) can use it; else ConfigError, one line:
    an unknown code, a language the model's vocabulary lacks, or a non-English language for an English-only
    model."""
    code = resolve_language(language)          # ConfigError for an unknown code or name
    if not tokenizer.is_multilingual:
        if code != "en":
            raise ConfigError(f"{model} is English-only; it cannot handle language {language!r} "
                              f"({language_name(code)}): use a multilingual teacher such as builtin:whisper-base")
        return code
    if code not in tokenizer.languages:
        raise ConfigError(f"{model} does not support language {language!r} ({language_name(code)}): it is not "
                          f"in its vocabulary ({len(tokenizer.languages)} languages)")
    return code


def _display(script: str) -> str:
    return "Han" if script == "CJK" else script.title()


def _script(ch: str) -> Optional[str]:
    try:
        return unicodedata.name(ch).split()[0]
    except ValueError:
        return None


def script_problem(text: Optional[str], language: Optional[str]) -> Optional[str]:
    """None when `text` is plausibly written in `language`'s script(s); else one line saying what is wrong.

    Counts the letters of the NFKC form of `text` by script. Wrong: more than MAX_FOREIGN_LETTERS of them in
    scripts foreign to the language, or (a language of another script than Latin) none in its own script.
    Text without letters (digits, punctuation, empty) is never wrong."""
    if not text or not language:
        return None
    code = _code(language)
    own = SCRIPTS.get(code, _LATIN)
    allowed = own | _LATIN
    counts: dict[str, int] = {}
    for ch in unicodedata.normalize("NFKC", text):
        if unicodedata.category(ch).startswith("L"):
            s = _script(ch) or "UNKNOWN"
            counts[s] = counts.get(s, 0) + 1
    letters = sum(counts.values())
    if not letters:
        return None
    foreign = {s: n for s, n in counts.items() if s not in allowed}
    written = " or ".join(sorted(_display(s) for s in own))
    if sum(foreign.values()) > MAX_FOREIGN_LETTERS * letters:
        parts = ", ".join(f"{n} {_display(s)}" for s, n in sorted(foreign.items(), key=lambda kv: -kv[1]))
        return (f"mixed scripts: {sum(foreign.values())} of its {letters} letters ({parts}) are not in the script "
                f"of its language {code} ({language_name(code)}, written in {written})")
    if own != _LATIN and not any(counts.get(s) for s in own):
        return (f"mixed scripts: none of its {letters} letters is in the script of its language {code} "
                f"({language_name(code)}, written in {written})")
    return None
