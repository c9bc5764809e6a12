"""Whisper's tokenizer: byte-level BPE that encodes exactly as OpenAI's tiktoken-based tokenizer.

The vocabulary comes from a CTranslate2 ``vocabulary.txt`` (one token per line, in id order, each
token written with GPT-2's byte-to-unicode mapping) or from a transformers directory
(``vocab.json`` + ``added_tokens.json`` / ``tokenizer.json``).

Encoding is tiktoken's: the vocabulary's byte tokens, in id order, are its mergeable ranks (the id
*is* the merge rank) and GPT-2's pre-tokenisation regex its pattern, exactly how OpenAI's whisper
builds its encodings; this module adds the Whisper layer (special, language and timestamp tokens,
prompts, timestamp decoding). The language codes and names are in dwjax/text/languages.py, the file
writers (vocabulary.txt, transformers' files with merges derived from the ranks) in
dwjax/weights/tokenizer_files.py.

Ids ``< eot`` are ordinary (byte) tokens; ``eot`` (``<|endoftext|>``) and everything after it
are special: ``<|startoftranscript|>``, the language tokens, ``<|translate|>``,
``<|transcribe|>``, ``<|startoflm|>``, ``<|startofprev|>``, ``<|nospeech|>`` (older files:
``<|nocaptions|>``), ``<|notimestamps|>`` and then the timestamps ``<|0.00|>`` ... ``<|30.00|>``
(``timestamp_begin = no_timestamps + 1``, 1501 of them, 0.02 s apart). A vocabulary without the
timestamp tokens gets them added, so that every id the model can emit has a meaning.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Iterable, Sequence

import tiktoken

from dwjax.errors import ConfigError, WeightsError
from dwjax.text.languages import LANGUAGES, resolve_language

# codes some older vocabularies use ("<|iw|>" in the English-only ones) -> today's code
_OLD_CODES: dict[str, str] = {"iw": "he"}

# GPT-2's pre-tokenisation (what tiktoken's "gpt2" / Whisper encodings use)
PRETOKENIZE_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>
TIME_PRECISION = 0.02  # seconds per timestamp step

_SPECIAL_RE = re.compile(r"^<\|[^|]*\|>$")
_TIMESTAMP_RE = re.compile(r"^<\|(\d+\.\d\d)\|>$")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used to write byte tokens as text.

    Bytes that are printable and not whitespace (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 bytes, in increasing order, get the characters U+0100, U+0101, ...
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    u2b = unicode_to_byte()
    try:
        return bytes(u2b[c] for c in token)
    except KeyError as e:
        raise WeightsError(f"vocabulary token {token!r} is not a GPT-2 byte-level token") from e


class WhisperTokenizer:
    """Whisper's byte-level BPE tokenizer with its special and timestamp tokens.

    ``tokens`` lists every token string in id order (ordinary tokens in GPT-2's byte-to-unicode
    form, then the special tokens). ``vocab_size`` (the model's embedding rows) may be larger than
    ``len(tokens)``: missing timestamp tokens are then added after ``<|notimestamps|>``.
    """

    def __init__(self, tokens: Sequence[str], vocab_size: int | None = None):
        tokens = list(tokens)
        try:
            eot = tokens.index("<|endoftext|>")
        except ValueError:
            raise WeightsError("the vocabulary has no <|endoftext|> token; it is not a Whisper vocabulary") from None
        self._n_mergeable = eot
        self._mergeable = [_token_bytes(t) for t in tokens[:eot]]
        self._ranks: dict[bytes, int] = {b: i for i, b in enumerate(self._mergeable)}
        if len(self._ranks) != eot:
            raise WeightsError("the vocabulary has duplicate byte tokens")
        missing = [b for b in range(256) if bytes([b]) not in self._ranks]
        if missing:
            raise WeightsError(f"the vocabulary lacks {len(missing)} of the 256 single-byte tokens")

        specials = {t: i for i, t in enumerate(tokens) if i >= eot}
        if len(specials) != len(tokens) - eot:
            raise WeightsError("the vocabulary has duplicate special tokens")

        def need(*names: str) -> int:
            for n in names:
                if n in specials:
                    return specials[n]
            raise WeightsError(f"the vocabulary has no {' or '.join(names)} token")

        self._eot = eot
        self._sot = need("<|startoftranscript|>")
        self._translate = need("<|translate|>")
        self._transcribe = need("<|transcribe|>")
        self._sot_lm = need("<|startoflm|>")
        self._sot_prev = need("<|startofprev|>")
        self._no_speech = need("<|nospeech|>", "<|nocaptions|>")
        self._no_timestamps = need("<|notimestamps|>")
        self._timestamp_begin = self._no_timestamps + 1

        # timestamps: keep those in the file (checking they are where they should be); add the rest
        n_file_ts = len(tokens) - self._timestamp_begin
        for k in range(n_file_ts):
            want = f"<|{k * TIME_PRECISION:.2f}|>"
            if tokens[self._timestamp_begin + k] != want:
                raise WeightsError(
                    f"vocabulary token {self._timestamp_begin + k} is {tokens[self._timestamp_begin + k]!r}, expected the timestamp {want!r}"
                )
        n_total = max(len(tokens), self._timestamp_begin + N_TIMESTAMPS if vocab_size is None else vocab_size)
        if vocab_size is not None and vocab_size < len(tokens):
            raise WeightsError(f"the vocabulary has {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
        for k in range(n_file_ts, n_total - self._timestamp_begin):
            tokens.append(f"<|{k * TIME_PRECISION:.2f}|>")
        self._tokens = tokens
        self._special_ids = {t: i for i, t in enumerate(tokens) if i >= eot}

        langs: dict[str, int] = {}
        for i in range(self._sot + 1, self._translate):
            t = tokens[i]
            code = t[2:-2] if _SPECIAL_RE.match(t) else None
            code = _OLD_CODES.get(code, code)
            if code in LANGUAGES and code not in langs:
                langs[code] = i
        self._languages = langs

        self._bpe = tiktoken.Encoding(name="whisper", pat_str=PRETOKENIZE_PATTERN, mergeable_ranks=self._ranks,
                                      special_tokens={})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vocabulary(cls, path: str | os.PathLike, vocab_size: int | None = None) -> "WhisperTokenizer":
        """Read a CTranslate2 ``vocabulary.txt`` (one token per line) or ``vocabulary.json`` (a list)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise WeightsError(f"no vocabulary file at {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json"):
            tokens = json.loads(text)
            if not isinstance(tokens, list):
                raise WeightsError(f"{path}: expected a JSON list of tokens")
        else:
            tokens = text.split("\n")  # not splitlines(): keep the exact token strings
            if tokens and tokens[-1] == "":
                tokens.pop()
            tokens = [t[:-1] if t.endswith("\r") else t for t in tokens]
        return cls(tokens, vocab_size=vocab_size)

    @classmethod
    def from_hf_files(cls, model_dir: str | os.PathLike, vocab_size: int | None = None) -> "WhisperTokenizer":
        """Read transformers' ``vocab.json`` plus ``added_tokens.json`` or ``tokenizer.json``'s added tokens."""
        model_dir = os.fspath(model_dir)
        with open(os.path.join(model_dir, "vocab.json"), encoding="utf-8") as f:
            ids: dict[str, int] = dict(json.load(f))
        added_path = os.path.join(model_dir, "added_tokens.json")
        tok_json = os.path.join(model_dir, "tokenizer.json")
        if os.path.isfile(added_path):
            with open(added_path, encoding="utf-8") as f:
                ids.update(json.load(f))
        if os.path.isfile(tok_json):
            with open(tok_json, encoding="utf-8") as f:
                for entry in json.load(f).get("added_tokens", []):
                    ids.setdefault(entry["content"], entry["id"])
        by_id: dict[int, str] = {}
        for tok, i in ids.items():
            if i in by_id and by_id[i] != tok:
                raise WeightsError(f"{model_dir}: id {i} names both {by_id[i]!r} and {tok!r}")
            by_id[i] = tok
        n = max(by_id) + 1
        # stop at the first hole (e.g. timestamps not listed); the constructor adds timestamps
        tokens = []
        for i in range(n):
            if i not in by_id:
                break
            tokens.append(by_id[i])
        return cls(tokens, vocab_size=vocab_size)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, vocab_size: int | None = None) -> "WhisperTokenizer":
        """The tokenizer of a model directory: CTranslate2 (``vocabulary.txt``/``.json``) or transformers.

        ``vocab_size`` defaults to a transformers ``config.json``'s ``vocab_size`` when there is one.
        """
        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise WeightsError(f"no model directory at {model_dir}")
        if vocab_size is None:
            cfg = os.path.join(model_dir, "config.json")
            if os.path.isfile(cfg):
                try:
                    with open(cfg, encoding="utf-8") as f:
                        v = json.load(f).get("vocab_size")
                    vocab_size = int(v) if v is not None else None
                except (ValueError, TypeError, AttributeError):
                    vocab_size = None
        for name in ("vocabulary.txt", "vocabulary.json"):
            p = os.path.join(model_dir, name)
            if os.path.isfile(p):
                return cls.from_vocabulary(p, vocab_size=vocab_size)
        if os.path.isfile(os.path.join(model_dir, "vocab.json")):
            return cls.from_hf_files(model_dir, vocab_size=vocab_size)
        raise WeightsError(f"{model_dir} has no vocabulary.txt, vocabulary.json or vocab.json")

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def eot(self) -> int:
        return self._eot

    @property
    def sot(self) -> int:
        return self._sot

    @property
    def sot_prev(self) -> int:
        return self._sot_prev

    @property
    def sot_lm(self) -> int:
        return self._sot_lm

    @property
    def no_speech(self) -> int:
        return self._no_speech

    @property
    def no_timestamps(self) -> int:
        return self._no_timestamps

    @property
    def timestamp_begin(self) -> int:
        return self._timestamp_begin

    @property
    def transcribe(self) -> int:
        return self._transcribe

    @property
    def translate(self) -> int:
        return self._translate

    @property
    def is_multilingual(self) -> bool:
        """As OpenAI decides it: multilingual models have 51865 or more tokens (English-only: 51864)."""
        return self.vocab_size >= 51865

    @property
    def languages(self) -> dict[str, int]:
        """Language code -> token id, for every language token in the vocabulary, in vocabulary order.

        English-only vocabularies also hold these tokens (the model was not trained on them).
        """
        return dict(self._languages)

    def language_token(self, language: str) -> int:
        """The id of ``<|xx|>`` for a language code or name."""
        code = resolve_language(language)
        if code not in self._languages:
            raise ConfigError(f"language {language!r} ({code}) is not in this model's vocabulary")
        return self._languages[code]

    def sot_sequence(self, language: str | None = None, task: str | None = "transcribe", timestamps: bool = False) -> list[int]:
        """The decoder prompt.

        Multilingual: ``[sot, <|lang|>, <|task|>]`` (+ ``<|notimestamps|>`` unless ``timestamps``);
        ``language=None`` leaves the language token out (for language detection), ``task=None``
        the task token. English-only: ``[sot]`` (+ ``<|notimestamps|>``); ``language`` must be
        None or English and ``task`` None or "transcribe".
        """
        if task not in (None, "transcribe", "translate"):
            raise ConfigError(f"unknown task {task!r}; use 'transcribe' or 'translate'")
        seq = [self._sot]
        if self.is_multilingual:
            if language is not None:
                seq.append(self.language_token(language))
            if task is not None:
                seq.append(self._transcribe if task == "transcribe" else self._translate)
        else:
            if language is not None and resolve_language(language) != "en":
                raise ConfigError(f"this model is English-only; it cannot use language {language!r}")
            if task == "translate":
                raise ConfigError("this model is English-only; it cannot translate")
        if not timestamps:
            seq.append(self._no_timestamps)
        return seq

    def special_ids(self) -> list[int]:
        """All special ids below the timestamps (``eot`` ... ``no_timestamps``)."""
        return list(range(self._eot, self._timestamp_begin))

    def token_to_id(self, token: str) -> int:
        """The id of a token written as in ``vocabulary.txt`` (byte-mapped) or a special token."""
        if token in self._special_ids:
            return self._special_ids[token]
        r = self._ranks.get(_token_bytes(token)) if all(c in unicode_to_byte() for c in token) else None
        if r is None:
            raise KeyError(f"{token!r} is not a token of this vocabulary")
        return r

    def id_to_token(self, token_id: int) -> str:
        """The token as written in ``vocabulary.txt``."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of an ordinary token; a special token's text, UTF-8 encoded."""
        self._check_id(token_id)
        if token_id < self._n_mergeable:
            return self._mergeable[token_id]
        return self._tokens[token_id].encode("utf-8")

    def _check_id(self, token_id: int) -> None:
        if not 0 <= int(token_id) < len(self._tokens):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self._tokens) - 1})")

    # ------------------------------------------------------------------ encoding
    def _encode_ordinary(self, text: str) -> list[int]:
        return self._bpe.encode_ordinary(text)   # lone surrogates are replaced, as OpenAI's whisper does

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``, without any special tokens added.

        Text that looks like a special token (``<|en|>``) is encoded as ordinary text unless
        ``allow_special`` is true, in which case it becomes that special (or timestamp) token.
        """
        if not allow_special:
            return self._encode_ordinary(text)
        out: list[int] = []
        pos = 0
        for m in re.finditer(r"<\|[^|<>]*\|>", text):
            tid = self._special_ids.get(m.group())
            if tid is None:
                continue
            out.extend(self._encode_ordinary(text[pos : m.start()]))
            out.append(tid)
            pos = m.end()
        out.extend(self._encode_ordinary(text[pos:]))
        return out

    # ------------------------------------------------------------------ decoding
    def _decode_bytes(self, ids: Iterable[int]) -> str:
        return b"".join(self._mergeable[i] for i in ids).decode("utf-8", errors="replace")

    def _ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        for i in out:
            self._check_id(i)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ordinary tokens; special and timestamp tokens are dropped.

        Invalid UTF-8 (a character cut between tokens) becomes U+FFFD.
        """
        return self._decode_bytes(i for i in self._ids(ids) if i < self._eot)

    def timestamp_seconds(self, token_id: int) -> float:
        """Seconds of a timestamp token."""
        if token_id < self._timestamp_begin:
            raise ValueError(f"token id {token_id} is not a timestamp")
        return round((token_id - self._timestamp_begin) * TIME_PRECISION, 2)

    def decode_with_timestamps(self, ids: Iterable[int]) -> str:
        """Like :meth:`decode`, with timestamp tokens written in place as ``<|1.08|>``.

        Other special tokens are dropped; each stretch of text between timestamps is decoded on its
        own (as OpenAI does).
        """
        parts: list[str] = []
        run: list[int] = []
        for i in self._ids(ids):
            if i >= self._timestamp_begin:
                parts.append(self._decode_bytes(run))
                run = []
                parts.append(f"<|{self.timestamp_seconds(i):.2f}|>")
            elif i < self._eot:
                run.append(i)
        parts.append(self._decode_bytes(run))
        return "".join(parts)

    def segments(self, ids: Iterable[int], duration: float | None = None) -> list[dict]:
        """Timestamped segments ``{"start", "end", "text"}`` of a decoded sequence.

        Rules: special tokens are ignored. A timestamp opens a segment; the next timestamp after
        some text closes it (its ``end``). Timestamps that follow one another without text between
        (the usual ``<|end|><|start|>`` pair, or a repeated start) only move the next segment's
        start to the last of them. Text before any timestamp starts at the previous end (0.0 at
        first). Text after the last timestamp ends at ``duration`` (None when not given).
        ``text`` is the decoded text, unstripped. Segments without text are not returned.
        """
        segs: list[dict] = []
        start: float | None = None
        last_end = 0.0
        run: list[int] = []
        for i in self._ids(ids):
            if i >= self._timestamp_begin:
                t = self.timestamp_seconds(i)
                if run:
                    segs.append({"start": start if start is not None else last_end, "end": t, "text": self._decode_bytes(run)})
                    run = []
                    last_end = t
                    start = None
                else:
                    start = t
            elif i < self._eot:
                run.append(i)
        if run:
            segs.append({"start": start if start is not None else last_end, "end": duration, "text": self._decode_bytes(run)})
        return segs

    # ------------------------------------------------------------------ suppression
    def non_speech_tokens(self) -> list[int]:
        """Ids of symbol tokens OpenAI suppresses by default (``suppress_tokens="-1"``), sorted.

        The set OpenAI computes: the tokens for " -" and " '", and for each symbol in its list the
        token(s) of the symbol with and without a leading space when that encodes to one token; for
        the musical signs ♩♪♫♬♭♮♯ the first token of either encoding, always.
        """
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        music = list("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for s in symbols + music:
            for ids in (self.encode(s), self.encode(" " + s)):
                if len(ids) == 1 or s in music:
                    result.add(ids[0])
        return sorted(result)

    @property
    def tokens(self) -> list[str]:
        """Every token string in id order (byte tokens in GPT-2's byte-to-unicode form, then the specials)."""
        return list(self._tokens)

    @property
    def ranks(self) -> dict[bytes, int]:
        """The byte tokens' merge ranks (= ids), tiktoken's mergeable_ranks."""
        return self._ranks

    def __repr__(self) -> str:
        kind = "multilingual" if self.is_multilingual else "English-only"
        return f"WhisperTokenizer({kind}, vocab_size={self.vocab_size}, languages={len(self._languages)})"
