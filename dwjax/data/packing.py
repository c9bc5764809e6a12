"""Packing short utterances into windows of <= 30 s (the distil-large-v3 recipe), for labelling.

    pack(utterances, max_s=30.0, gap_s=DEFAULT_GAP_S, max_tokens=None, short_fraction=0.0, seed=0)
        -> Packing(windows, unpacked)
    window_audio(window, audios, gap_s=DEFAULT_GAP_S) -> float32 16 kHz array

Rules (all of `pack` is a pure function of its arguments):
  * Utterances are grouped by `source` (speaker / recording key), in the order each source first appears; within a
    group the input order is kept. A window never holds two sources. Utterances without a source (None) form one
    group of their own, packed in input order.
  * Greedy, in order: the next utterance joins the open window when it still ends at or before `max_s` (its offset
    is the previous member's end plus `gap_s` of silence) and, when `max_tokens` is given and the utterance carries
    a token estimate, the window's estimated label tokens stay <= `max_tokens`; otherwise the window is closed and
    the utterance opens the next one. An utterance is never split. An utterance that alone is longer than `max_s`
    is not packed: it is returned in `unpacked` (the caller labels it on its own: per clip, or long-form above
    30 s). An utterance whose token estimate alone exceeds `max_tokens` gets a window of its own.
  * `short_fraction` > 0: that fraction of windows (drawn per window from a hash of `seed` and the id of the
    utterance that opens it, so the packing stays a pure function) gets a shorter target, uniform in (0, max_s],
    and closes when the next utterance would end past it (it still holds at least its first utterance). Students
    trained only on full windows never see a short clip followed by silence, which is what short-form
    transcription gives them.
  * Lengths are compared to `max_s` with a tolerance of 1e-9 s (sums of floats).
  * The first member starts at offset 0; member k + 1 starts at offset_k + duration_k + gap_s. A window's
    `duration_s` is its last member's end (no trailing gap), so it is <= max_s.
  * `reference`: the members' reference texts, stripped and joined with one space, when every member has a
    non-empty one; otherwise None (a window is scored against its references only as a whole).
  * Window id: `<first member id>+<number of members>` (e.g. "utt007+6"). Members are disjoint, so ids are
    unique within a dataset for one packing. The same utterances (ids, durations, sources, token estimates) in the
    same order with the same options always give the same windows.

DEFAULT_GAP_S = 0.5 s of digital silence between clips: enough for the teacher to place a segment boundary
(Whisper's timestamps have 0.02 s resolution) and about a natural pause between sentences, short enough to waste
little of the window (at 2-5 s clips, 10-20 % of it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["DEFAULT_GAP_S", "DEFAULT_PACK_S", "MAX_WINDOW_S", "Utterance", "Member", "Window", "Packing", "pack",
           "window_target_s", "window_id", "keyed_uniform",
           "window_audio", "members_json", "members_from_json"]

DEFAULT_GAP_S = 0.5
MAX_WINDOW_S = 30.0            # Whisper's input window
#: the longest window `dwjax pseudo-label --pack` packs by default. Whisper learned that speech running to the end of
#: its 30 s window continues in the next one, so near a full window it ends early, after a timestamp, and the last
#: utterances get no text. Measured (tiny.en, 300 kathleen clips): windows of <= 30 s -> label WER 11.5 % against the
#: joined references, 42 % of windows within the 10 % filter; <= 24 s -> 3.5 % (per clip: ~4 %), 100 % kept.
DEFAULT_PACK_S = 24.0
SAMPLE_RATE = 16000


@dataclasses.dataclass(frozen=True)
class Utterance:
    id: str
    duration_s: float
    text: Optional[str] = None        # reference text, if any
    source: Optional[str] = None      # speaker / recording key, if known
    tokens: Optional[int] = None      # estimated label tokens (for `max_tokens`), if known


@dataclasses.dataclass(frozen=True)
class Member:
    id: str
    offset_s: float                   # start of the clip in the window
    duration_s: float

    @property
    def end_s(self) -> float:
        return self.offset_s + self.duration_s


@dataclasses.dataclass(frozen=True)
class Window:
    id: str
    source: Optional[str]
    members: tuple[Member, ...]
    reference: Optional[str]
    tokens: Optional[int] = None      # sum of the members' token estimates (None if any is unknown)

    @property
    def duration_s(self) -> float:
        return self.members[-1].end_s

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.members]


@dataclasses.dataclass(frozen=True)
class Packing:
    windows: list[Window]
    unpacked: list[Utterance]         # utterances longer than max_s alone, in input order


def window_id(first_id: str, n_members: int) -> str:
    return f"{first_id}+{n_members}"


def _joined_reference(texts: Sequence[Optional[str]]) -> Optional[str]:
    stripped = [t.strip() if t is not None else "" for t in texts]
    return " ".join(stripped) if all(stripped) else None


def _make_window(source: Optional[str], group: list[Utterance], gap_s: float) -> Window:
    members, offset = [], 0.0
    for u in group:
        members.append(Member(u.id, offset, float(u.duration_s)))
        offset += float(u.duration_s) + gap_s
    tokens = None if any(u.tokens is None for u in group) else sum(int(u.tokens) for u in group)
    return Window(window_id(group[0].id, len(group)), source, tuple(members),
                  _joined_reference([u.text for u in group]), tokens)


def keyed_uniform(seed: int, key: str, salt: str) -> float:
    """A number in [0, 1) that depends only on (seed, key, salt)."""
    digest = hashlib.sha256(f"{seed}\0{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def window_target_s(first_id: str, max_s: float, short_fraction: float, seed: int) -> float:
    """The length a window opened by `first_id` is filled to: max_s, or for a `short_fraction` of windows a
    length uniform in (0, max_s]."""
    if short_fraction > 0 and keyed_uniform(seed, first_id, "short") < short_fraction:
        return max_s * (1.0 - keyed_uniform(seed, first_id, "length"))
    return max_s


def pack(utterances: Iterable[Utterance], max_s: float = MAX_WINDOW_S, gap_s: float = DEFAULT_GAP_S,
         max_tokens: Optional[int] = None, short_fraction: float = 0.0, seed: int = 0) -> Packing:
    """Windows of consecutive utterances of one source (see the module docstring)."""
    if not 0 < max_s <= MAX_WINDOW_S:
        raise ValueError(f"max_s must be in (0, {MAX_WINDOW_S:g}] s, got {max_s}")
    if gap_s < 0:
        raise ValueError(f"gap_s must be >= 0, got {gap_s}")
    if not 0 <= short_fraction <= 1:
        raise ValueError(f"short_fraction must be in [0, 1], got {short_fraction}")
    groups: dict[Optional[str], list[Utterance]] = {}
    position: dict[int, int] = {}
    for i, u in enumerate(utterances):
        groups.setdefault(u.source, []).append(u)
        position[id(u)] = i
    windows: list[Window] = []
    unpacked: list[Utterance] = []
    eps = 1e-9
    for source, group in groups.items():
        current: list[Utterance] = []
        end = 0.0
        tokens = 0
        target = max_s
        for u in group:
            d = float(u.duration_s)
            if d > max_s + eps:
                unpacked.append(u)
                continue
            if current:
                fits = end + gap_s + d <= target + eps
                if max_tokens is not None and u.tokens is not None and tokens + u.tokens > max_tokens:
                    fits = False
                if fits:
                    current.append(u)
                    end += gap_s + d
                    tokens += u.tokens or 0
                    continue
                windows.append(_make_window(source, current, gap_s))
            current, end, tokens = [u], d, u.tokens or 0
            target = window_target_s(u.id, max_s, short_fraction, seed)
        if current:
            windows.append(_make_window(source, current, gap_s))
    unpacked.sort(key=lambda u: position[id(u)])       # input order (they were collected group by group)
    return Packing(windows, unpacked)


def window_audio(window: Window, audios: Sequence[np.ndarray], gap_s: float = DEFAULT_GAP_S,
                 sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The window's audio: the members' 16 kHz arrays (in member order) joined by `gap_s` of zeros.

    Each member starts at round(offset_s * sample_rate); an array whose length differs from its member's
    duration by more than one sample is refused (the offsets would no longer describe the audio)."""
    if len(audios) != len(window.members):
        raise ValueError(f"window {window.id}: {len(window.members)} members but {len(audios)} arrays")
    total = int(round(window.duration_s * sample_rate))
    out = np.zeros((total,), np.float32)
    for m, a in zip(window.members, audios):
        a = np.asarray(a, np.float32).reshape(-1)
        if abs(len(a) - m.duration_s * sample_rate) > 1.0:
            raise ValueError(f"window {window.id}: clip {m.id} holds {len(a)} samples, its member says "
                             f"{m.duration_s:.6f} s")
        start = int(round(m.offset_s * sample_rate))
        n = min(len(a), total - start)
        out[start: start + n] = a[:n]
    return out


def members_json(window: Window, extra: Optional[dict] = None) -> str:
    """The `members` column of a packed label row: [{"id", "offset_s", "duration_s", ...extra[id]}]."""
    extra = extra or {}
    return json.dumps([{"id": m.id, "offset_s": m.offset_s, "duration_s": m.duration_s, **extra.get(m.id, {})}
                       for m in window.members], ensure_ascii=False)


def members_from_json(text: Optional[str]) -> list[dict]:
    return json.loads(text) if text else []
