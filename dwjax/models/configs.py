"""Whisper shapes. `WhisperConfig` describes the network only; dtypes and scan/remat are options of the module."""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    n_mels: int = 80                 # mel bins of the input features (80; 128 from large-v3)
    n_audio_ctx: int = 1500          # encoder positions (30 s of audio after the stride-2 conv)
    n_text_ctx: int = 448            # decoder positions
    d_model: int = 384               # width of encoder and decoder
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_heads: int = 6
    decoder_heads: int = 6
    ffn_dim: int = 1536              # MLP hidden width (4 x d_model in every official shape)
    vocab_size: int = 51864          # 51864 for .en models, 51865 multilingual, 51866 large-v3

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_heads

    @property
    def is_multilingual(self) -> bool:
        return self.vocab_size >= 51865

    def replace(self, **kw) -> "WhisperConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WhisperConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _shape(d, layers, heads, vocab=51865, n_mels=80, dec_layers=None):
    return WhisperConfig(n_mels=n_mels, d_model=d, encoder_layers=layers, decoder_layers=dec_layers or layers,
                         encoder_heads=heads, decoder_heads=heads, ffn_dim=4 * d, vocab_size=vocab)


# The official OpenAI shapes; `.en` variants have a 51864-token vocabulary.
OFFICIAL: dict[str, WhisperConfig] = {
    "tiny": _shape(384, 4, 6),
    "base": _shape(512, 6, 8),
    "small": _shape(768, 12, 12),
    "medium": _shape(1024, 24, 16),
    "large-v1": _shape(1280, 32, 20),
    "large-v2": _shape(1280, 32, 20),
    "large-v3": _shape(1280, 32, 20, vocab=51866, n_mels=128),
    "turbo": _shape(1280, 32, 20, vocab=51866, n_mels=128, dec_layers=4),
}
for _name in ("tiny", "base", "small", "medium"):
    OFFICIAL[_name + ".en"] = OFFICIAL[_name].replace(vocab_size=51864)
OFFICIAL["large-v3-turbo"] = OFFICIAL["turbo"]


def official(name: str) -> WhisperConfig:
    key = name.removeprefix("whisper-").removeprefix("openai/whisper-")
    if key not in OFFICIAL:
        raise KeyError(f"unknown Whisper shape {name!r}; known: {', '.join(sorted(OFFICIAL))}")
    return OFFICIAL[key]
