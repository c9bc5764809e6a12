"""A tokenizer's files for other toolkits: CTranslate2 / faster-whisper's ``vocabulary.txt`` and transformers'
Whisper tokenizer files (vocab.json, merges.txt, added_tokens.json, special_tokens_map.json, tokenizer_config.json).

    write_vocabulary(tokenizer, directory) -> path of vocabulary.txt
    write_hf_files(tokenizer, directory)   -> directory
    bpe_merges(tokenizer)                  -> GPT-2 style merges derived from the ranks (transformers' BPE needs them)

Whisper's tokenizer is defined by ranks alone (tiktoken); GPT-2 style BPE files need merges, which are derived
here: for every byte token of two or more bytes, the pair that rank-ordered merging of its bytes joins last.
"""
from __future__ import annotations

import json
import os

from dwjax.text.tokenizer import WhisperTokenizer, byte_to_unicode

__all__ = ["write_vocabulary", "write_hf_files", "bpe_merges"]


def _text(data: bytes) -> str:
    """A byte token written in GPT-2's byte-to-unicode form (how vocabulary files spell it)."""
    b2u = byte_to_unicode()
    return "".join(b2u[b] for b in data)


def _merge_until(ranks: dict[bytes, int], piece: bytes) -> list[bytes]:
    """tiktoken's rank-ordered pair merging of `piece`'s bytes, stopped before the merge that makes the whole
    piece: the two parts it joins last (or more parts, when merging cannot reach it)."""
    parts = [piece[i: i + 1] for i in range(len(piece))]
    while len(parts) > 2:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i: best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def bpe_merges(tokenizer: WhisperTokenizer) -> list[tuple[str, str]]:
    """GPT-2 style merges derived from the ranks, in rank order: for every byte token of two or more bytes, the
    pair of tokens that rank-ordered merging of its bytes joins last (when that merging cannot reach the token,
    the split into two tokens whose larger id is smallest)."""
    ranks = tokenizer.ranks
    out: list[tuple[str, str]] = []
    for tok in sorted(ranks, key=ranks.__getitem__):
        if len(tok) < 2:
            continue
        parts = _merge_until(ranks, tok)
        if len(parts) != 2:
            best = None
            for k in range(1, len(tok)):
                a, b = ranks.get(tok[:k]), ranks.get(tok[k:])
                if a is not None and b is not None and (best is None or max(a, b) < best[0]):
                    best = (max(a, b), k)
            if best is None:
                continue
            parts = [tok[: best[1]], tok[best[1]:]]
        out.append((_text(parts[0]), _text(parts[1])))
    return out


def write_vocabulary(tokenizer: WhisperTokenizer, directory: str | os.PathLike) -> str:
    """Write ``vocabulary.txt`` (every token in id order, timestamps included) into `directory`; returns its path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocabulary.txt")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(tokenizer.tokens) + "\n")
    return path


def _write_json(directory: str, name: str, value, indent=None) -> None:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=indent)


def write_hf_files(tokenizer: WhisperTokenizer, directory: str | os.PathLike) -> str:
    """Write transformers' Whisper tokenizer files into `directory`; returns it."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tokens, eot_id = tokenizer.tokens, tokenizer.eot
    _write_json(directory, "vocab.json", {tokens[i]: i for i in range(eot_id)})
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in bpe_merges(tokenizer):
            f.write(f"{a} {b}\n")
    _write_json(directory, "added_tokens.json", {tokens[i]: i for i in range(eot_id, len(tokens))}, indent=1)
    eot = "<|endoftext|>"
    specials = tokens[eot_id + 1: tokenizer.timestamp_begin]
    _write_json(directory, "special_tokens_map.json",
                {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot,
                 "additional_special_tokens": specials}, indent=1)
    _write_json(directory, "tokenizer_config.json",
                {"tokenizer_class": "WhisperTokenizer", "add_prefix_space": False, "bos_token": eot,
                 "eos_token": eot, "unk_token": eot, "pad_token": eot, "additional_special_tokens": specials,
                 "errors": "replace", "model_max_length": 1024, "clean_up_tokenization_spaces": False}, indent=1)
    return directory
