"""`Transcript`: one recording's decoding (text, tokens, language, confidence, segments), and `compression_ratio`."""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data))) if data else 0.0


@dataclasses.dataclass
class Transcript:
    text: str
    tokens: list[int]
    language: Optional[str]
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    duration_s: float
    segments: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
