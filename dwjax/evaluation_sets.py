"""The sets `dwjax evaluate` derives from a set of clips: noisy copies (white noise, babble of other clips of the
set, or a noise file, at an SNR; deterministic per (seed, clip)) and long recordings (consecutive clips joined with
0.5 s pauses). A set's items are (id, reference, audio) with 16 kHz float32 audio."""
from __future__ import annotations

import numpy as np

from dwjax.audio import SAMPLE_RATE, load_audio, mix_at_snr, white_noise
from dwjax.errors import UserError


def _babble(items, i, talkers, rng):
    """The sum of up to `talkers` other clips of the set (each at unit RMS, tiled or cut to clip `i`'s length)."""
    others = [j for j in range(len(items)) if j != i]
    if not others:
        raise UserError("babble noise needs at least two utterances in the set")
    pick = rng.choice(others, size=min(talkers, len(others)), replace=False)
    n = len(items[i][2])
    mix = np.zeros(n, np.float64)
    for j in pick:
        a = np.asarray(items[j][2], np.float64)
        a = np.resize(a, n)     # tile / crop to the utterance length
        mix += a / max(np.sqrt(np.mean(a ** 2)), 1e-8)
    return mix.astype(np.float32)


def noisy_audio(items, kind: str, snr: float, seed: int, talkers: int = 4) -> list[np.ndarray]:
    """The set's utterances mixed with `kind` noise at `snr` dB; deterministic per (seed, utterance index)."""
    out = []
    noise_file = None
    if kind not in ("white", "babble"):
        noise_file = load_audio(kind)
    for i, (_, _, audio) in enumerate(items):
        rng = np.random.default_rng([seed, i])
        if kind == "white":
            noise = white_noise(len(audio), rng)
        elif kind == "babble":
            noise = _babble(items, i, talkers, rng)
        else:
            noise = noise_file
        out.append(mix_at_snr(audio, noise, float(snr), rng))
    return out


def long_recordings(items, seconds: float):
    """Consecutive utterances joined (0.5 s pauses) into recordings of about `seconds`: [(reference, audio)]."""
    pause = np.zeros(SAMPLE_RATE // 2, np.float32)
    recs, refs, parts, total = [], [], [], 0
    for _, text, audio in items:
        refs.append(text)
        parts += [audio, pause]
        total += len(audio) + len(pause)
        if total >= seconds * SAMPLE_RATE:
            recs.append((" ".join(refs), np.concatenate(parts)))
            refs, parts, total = [], [], 0
    if parts and (not recs or total > 30 * SAMPLE_RATE):
        recs.append((" ".join(refs), np.concatenate(parts)))
    elif parts:   # a short remainder joins the last recording
        ref, audio = recs.pop()
        recs.append((ref + " " + " ".join(refs), np.concatenate([audio] + parts)))
    return recs
