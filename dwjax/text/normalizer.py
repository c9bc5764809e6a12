"""Whisper's text normalisers, as OpenAI uses them to score WER.

``normalize_english`` is OpenAI's ``EnglishTextNormalizer`` (lower case; drops text in brackets and
parentheses and the fillers hmm/mm/mhm/mmm/uh/um; expands contractions and titles; spells numbers
and currencies with digits, "twenty five dollars" -> "$25"; British -> American spelling; drops the
remaining punctuation and diacritics; collapses whitespace). It is built from the
``whisper_normalizer`` package, whose recent versions add four rules OpenAI does not have
("kinda", "sorta", "dunno", "cause" -> "because"); they are taken out so that scores match OpenAI's
and the published Whisper / Distil-Whisper numbers.

``normalize_basic`` is OpenAI's ``BasicTextNormalizer`` for other languages (lower case, drop
bracketed text, symbols and punctuation -> spaces, collapse whitespace).
"""
from __future__ import annotations

from functools import lru_cache

from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

# rules whisper_normalizer adds to OpenAI's EnglishTextNormalizer
_EXTRA_RULES = (r"\bkinda\b", r"\bsorta\b", r"\bdunno\b", r"\bcause\b")


@lru_cache(maxsize=1)
def _english():
    norm = EnglishTextNormalizer()
    for pattern in _EXTRA_RULES:
        norm.replacers.pop(pattern, None)
    return norm


@lru_cache(maxsize=4)
def _basic(remove_diacritics: bool, split_letters: bool):
    return BasicTextNormalizer(remove_diacritics=remove_diacritics, split_letters=split_letters)


def normalize_english(text: str) -> str:
    """OpenAI's Whisper English normalisation of ``text`` (see the module docstring)."""
    return _english()(text)


def normalize_basic(text: str, remove_diacritics: bool = False, split_letters: bool = False) -> str:
    """OpenAI's basic (language-independent) normalisation of ``text``.

    ``remove_diacritics`` also strips accents; ``split_letters`` separates every grapheme with a
    space (for scripts written without spaces, to score a character error rate as WER).
    """
    return _basic(bool(remove_diacritics), bool(split_letters))(text)
