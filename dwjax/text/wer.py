"""Word error rate and its parts, scored the way Whisper's papers do.

Both sides are normalised (``normalize_english`` by default) and split on whitespace; jiwer aligns
each pair. Rates are corpus level: sums of substitutions, deletions and insertions over all pairs,
divided by the total number of reference words (not a mean of per-utterance rates).

Pairs whose *normalised reference* is empty (e.g. "[noise]", "uh") have no words to score: they
are left out of every rate and counted in ``n_empty_refs``; the words hypothesised for them are
counted in ``empty_ref_hyp_words`` (a hallucination signal). When no reference word remains at
all, the rates are NaN.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import jiwer

from dwjax.text.normalizer import normalize_english

Normalizer = Callable[[str], str]


def _as_list(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def _normalizer(normalize: bool | Normalizer) -> Normalizer:
    if callable(normalize):
        return normalize
    return normalize_english if normalize else (lambda s: s)


def _align(references, hypotheses, normalize, joiner: str, process, hyp_size) -> dict:
    """The shared count of `error_rates` (words: joiner " ", jiwer.process_words) and `char_error_rates`
    (characters: joiner "", all whitespace removed): normalise each pair, set aside pairs whose reference is empty
    (counting them and their hypothesis' size), align the rest with jiwer in one call."""
    refs, hyps = _as_list(references), _as_list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    norm = _normalizer(normalize)
    kept_r: list[str] = []
    kept_h: list[str] = []
    n_empty = empty_hyp = 0
    for r, h in zip(refs, hyps):
        r = joiner.join(norm(r).split())
        h = joiner.join(norm(h).split())
        if not r:
            n_empty += 1
            empty_hyp += hyp_size(h)
            continue
        kept_r.append(r)
        kept_h.append(h)
    s = d = i = hits = 0
    if kept_r:
        out = process(kept_r, kept_h)
        s, d, i, hits = out.substitutions, out.deletions, out.insertions, out.hits
    n = s + d + hits
    return {"s": s, "d": d, "i": i, "hits": hits, "n": n, "n_pairs": len(kept_r), "n_empty": n_empty,
            "empty_hyp": empty_hyp, "rate": (lambda x: x / n) if n else (lambda x: math.nan)}


def error_rates(references: str | Sequence[str], hypotheses: str | Sequence[str], normalize: bool | Normalizer = True) -> dict:
    """Corpus-level error rates of ``hypotheses`` against ``references`` (same length, paired).

    ``normalize``: True uses :func:`normalize_english`, False only splits on whitespace, or pass a
    function (e.g. :func:`dwjax.text.normalizer.normalize_basic`).

    Returns ``wer = (S + D + I) / N``, ``ser = S / N``, ``der = D / N``, ``ier = I / N``, the counts
    ``substitutions``, ``deletions``, ``insertions``, ``hits``, ``n_ref_words`` (N), and
    ``n_pairs`` (pairs scored), ``n_empty_refs`` and ``empty_ref_hyp_words`` (see the module
    docstring).
    """
    c = _align(references, hypotheses, normalize, " ", jiwer.process_words, lambda h: len(h.split()))
    return {"wer": c["rate"](c["s"] + c["d"] + c["i"]), "ser": c["rate"](c["s"]), "der": c["rate"](c["d"]),
            "ier": c["rate"](c["i"]), "substitutions": c["s"], "deletions": c["d"], "insertions": c["i"],
            "hits": c["hits"], "n_ref_words": c["n"], "n_pairs": c["n_pairs"], "n_empty_refs": c["n_empty"],
            "empty_ref_hyp_words": c["empty_hyp"]}


def wer(references: str | Sequence[str], hypotheses: str | Sequence[str], normalize: bool | Normalizer = True) -> float:
    """Corpus WER, ``(S + D + I) / N`` over all pairs, on normalised text (see :func:`error_rates`)."""
    return error_rates(references, hypotheses, normalize)["wer"]


def repeated_ngrams(text: str, n: int = 5, normalize: bool | Normalizer = False) -> int:
    """How many word n-grams of ``text`` repeat an earlier one (a measure of looping output).

    The words are ``text.split()`` (after normalising when ``normalize`` is set); every window of
    ``n`` consecutive words is an n-gram (windows overlap). The result is the sum over distinct
    n-grams of (occurrences - 1), i.e. the number of windows minus the number of distinct
    n-grams. Text with fewer than ``n`` words gives 0; "a b c d e a b c d e" gives 1 for n=5
    (windows: 6, distinct: 5).
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    words = _normalizer(normalize)(text).split()
    if len(words) < n:
        return 0
    counts = Counter(tuple(words[k : k + n]) for k in range(len(words) - n + 1))
    return sum(c - 1 for c in counts.values())


def char_error_rates(references: str | Sequence[str], hypotheses: str | Sequence[str],
                     normalize: bool | Normalizer = True) -> dict:
    """Corpus-level character error rate of ``hypotheses`` against ``references`` (same length, paired).

    For languages written without spaces between words (see :mod:`dwjax.text.languages`). Both sides are
    normalised (``normalize`` as in :func:`error_rates`; callers pass the basic normaliser) and then *all
    whitespace is removed*: the spaces a normaliser leaves where punctuation was are not characters of the
    language, and a hypothesis should not be charged for them. jiwer aligns the characters of each pair.
    ``cer = (S + D + I) / N`` with N the number of reference characters over all pairs; pairs whose
    normalised reference is empty are left out and counted (``n_empty_refs``, ``empty_ref_hyp_chars``).
    """
    c = _align(references, hypotheses, normalize, "", jiwer.process_characters, len)
    return {"cer": c["rate"](c["s"] + c["d"] + c["i"]), "ser": c["rate"](c["s"]), "der": c["rate"](c["d"]),
            "ier": c["rate"](c["i"]), "substitutions": c["s"], "deletions": c["d"], "insertions": c["i"],
            "hits": c["hits"], "n_ref_chars": c["n"], "n_pairs": c["n_pairs"], "n_empty_refs": c["n_empty"],
            "empty_ref_hyp_chars": c["empty_hyp"]}
