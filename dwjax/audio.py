"""Audio in, Whisper features out.

- `load_audio(path)` / `load_audio_bytes(data)`: decode (wav/flac/ogg/mp3 via libsndfile), downmix to mono,
  resample with soxr to 16 kHz; float32 numpy. Unusable audio raises `AudioError` naming the file: missing,
  unreadable, empty, non-finite, or a truncated WAV (its header promises more audio than the file holds; libsndfile
  would silently return the shorter audio, where a cut FLAC is an error). Every command loads audio through these.
- `is_silent(audio)`: peak amplitude below `SILENCE_PEAK` (no speech at all); `transcribe` rejects such files and
  `pseudo-label` records them as "no speech" without a label.
- `log_mel_spectrogram(audio, n_mels)`: Whisper's log-mel features in JAX (jittable, batched), equal to
  transformers' `WhisperFeatureExtractor` to ~1e-5.
- `mix_at_snr`, `white_noise`: additive noise for robustness evaluation.
"""

from __future__ import annotations

import functools
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import soundfile
import soxr

from dwjax.errors import AudioError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
SILENCE_PEAK = 1e-4  # a clip whose peak amplitude is below this holds no speech (pure digital silence or near it)

# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def is_silent(audio: np.ndarray) -> bool:
    """True when the clip's peak amplitude is below SILENCE_PEAK (or it has no samples)."""
    audio = np.asarray(audio)
    return audio.size == 0 or float(np.max(np.abs(audio))) < SILENCE_PEAK


# RIFF data-chunk sizes that streaming writers (ffmpeg, sox to a pipe) leave as placeholders: the length is unknown
_UNKNOWN_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)


def _check_wav_complete(f, total: int, name: str) -> None:
    """Raise AudioError when the RIFF/WAVE file `f` (a binary file object of `total` bytes) is cut short: its data
    chunk declares more bytes (by at least one frame) than the file holds. Not a WAV, RF64, a placeholder size
    or an unparseable header: no verdict here (libsndfile decides)."""
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RIFX"):
        return
    order = "little" if head[:4] == b"RIFF" else "big"
    offset, block_align = 12, 1
    while offset + 8 <= total:
        f.seek(offset)
        chunk = f.read(8)
        if len(chunk) < 8:
            return
        cid, size = chunk[:4], int.from_bytes(chunk[4:8], order)
        if cid == b"fmt ":
            fmt = f.read(min(size, 16))
            if len(fmt) >= 14:
                block_align = max(1, int.from_bytes(fmt[12:14], order))
        elif cid == b"data":
            available = total - (offset + 8)
            if size in _UNKNOWN_SIZES or available < 0:
                return
            if size - available >= block_align:
                raise AudioError(
                    f"audio file {name} is truncated: its WAV header promises {size} bytes of audio "
                    f"({size // block_align} frames) but the file holds {available} ({available // block_align} "
                    "frames): the file was cut short")
            return
        offset += 8 + size + (size & 1)


def _decode(source, name: str, sample_rate: int) -> np.ndarray:
    """Decode `source` (a path or a file-like object) into float32 mono at `sample_rate`; `name` is for messages."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                _check_wav_complete(f, os.fstat(f.fileno()).st_size, name)
        else:
            _check_wav_complete(source, source.getbuffer().nbytes, name)
            source.seek(0)
    except OSError as exc:
        raise AudioError(f"cannot read audio file {name}: {exc.strerror or exc}") from None
    try:
        data, source_rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises LibsndfileError/RuntimeError/TypeError for bad input
        detail = str(getattr(exc, "error_string", "") or exc).strip()
        detail = detail.splitlines()[0] if detail else type(exc).__name__
        if "does not exist" in detail or "not a regular file" in detail:  # libsndfile's words for unknown mp3 data
            detail = "format not recognised"
        raise AudioError(
            f"cannot decode audio file {name} (expected wav/flac/ogg/mp3; corrupt or unsupported): {detail}"
        ) from None
    if data.shape[0] == 0:
        raise AudioError(f"audio file {name} is empty (0 samples)")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"audio file {name} contains non-finite samples (NaN or inf)")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float64).astype(np.float32)
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.shape[0] == 0:
        raise AudioError(f"audio file {name} is empty after resampling to {sample_rate} Hz")
    return mono


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file (wav/flac/ogg/mp3, any rate, any channel count) as float32 mono at `sample_rate`.

    Raises AudioError for a missing, unreadable, empty, truncated (WAV) or non-finite file. Silence is returned as
    is (see `is_silent`).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"audio file {path} does not exist")
    if os.path.isdir(path):
        raise AudioError(f"audio file {path} is a directory, not a file")
    return _decode(path, path, sample_rate)


def load_audio_bytes(data: bytes, sample_rate: int = SAMPLE_RATE, name: str = "<bytes>") -> np.ndarray:
    """`load_audio` for an encoded file held in memory (e.g. a dataset's audio column); `name` labels errors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AudioError(f"audio {name} is {type(data).__name__}, expected the encoded file's bytes")
    if len(data) == 0:
        raise AudioError(f"audio file {name} is empty (0 bytes)")
    return _decode(io.BytesIO(bytes(data)), name, sample_rate)


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------


def pad_or_trim(audio: np.ndarray, n_samples: int = N_SAMPLES) -> np.ndarray:
    """Zero-pad or cut the last axis of `audio` to exactly `n_samples` (numpy; returns float32)."""
    audio = np.asarray(audio, dtype=np.float32)
    length = audio.shape[-1]
    if length > n_samples:
        return audio[..., :n_samples]
    if length < n_samples:
        widths = [(0, 0)] * (audio.ndim - 1) + [(0, n_samples - length)]
        return np.pad(audio, widths)
    return audio


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log_part = 15.0 + np.log(np.maximum(hz, 1e-300) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log_part, linear)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, linear)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-normalised triangular mel filterbank, float64, shape (n_fft // 2 + 1, n_mels), 0 Hz to Nyquist."""
    n_bins = n_fft // 2 + 1
    bin_hz = np.linspace(0.0, sample_rate // 2, n_bins)
    edge_mels = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sample_rate / 2), n_mels + 2)
    edge_hz = _mel_to_hz_slaney(edge_mels)
    lower, centre, upper = edge_hz[:-2], edge_hz[1:-1], edge_hz[2:]
    rising = (bin_hz[:, None] - lower[None, :]) / (centre - lower)[None, :]
    falling = (upper[None, :] - bin_hz[:, None]) / (upper - centre)[None, :]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (upper - lower)[None, :]  # equal area per filter
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=None)
def _hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window (as torch.hann_window / Whisper), float64."""
    n = np.arange(n_fft, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)


def _frames(padded: jnp.ndarray, n_frames: int) -> jnp.ndarray:
    """(batch, samples) -> (batch, n_frames, N_FFT) overlapping frames with hop HOP_LENGTH."""
    index = np.arange(n_frames)[:, None] * HOP_LENGTH + np.arange(N_FFT)[None, :]
    return padded[:, index]


def _power_spectrum(frames: jnp.ndarray) -> jnp.ndarray:
    """|rfft(hann * frame)|^2 over the last axis: (..., N_FFT) -> (..., N_FFT // 2 + 1).

    jnp.fft.rfft, not a matmul against a DFT matrix: on the 2-core dev CPU, for a batch of 8 x 30 s, the whole
    log-mel took ~57-86 ms with rfft and ~111-156 ms with a (400 x 402) windowed [cos | -sin] matmul at HIGHEST
    precision; both matched transformers to < 1e-5.
    """
    spectrum = jnp.fft.rfft(frames * jnp.asarray(_hann_window(N_FFT), jnp.float32), n=N_FFT, axis=-1)
    return spectrum.real**2 + spectrum.imag**2


@functools.partial(jax.jit, static_argnames=("n_mels", "n_samples"))
def log_mel_spectrogram(audio: jnp.ndarray, n_mels: int = 80, n_samples: int = N_SAMPLES) -> jnp.ndarray:
    """Whisper log-mel features: (batch, samples) or (samples,) 16 kHz audio -> (batch, n_mels, n_samples // 160).

    Each clip is zero-padded / cut to `n_samples` (30 s), then: reflect-padded STFT (n_fft 400, hop 160, periodic
    Hann), power spectrum without the last frame, Slaney mel filterbank, log10(max(mel, 1e-10)), clamped to
    (max - 8) per example, scaled as (x + 4) / 4. float32, matmuls at HIGHEST precision.
    """
    audio = jnp.asarray(audio, jnp.float32)
    if audio.ndim == 1:
        audio = audio[None, :]
    if audio.ndim != 2:
        raise ValueError(f"log_mel_spectrogram wants (batch, samples) or (samples,) audio, got shape {audio.shape}")
    length = audio.shape[-1]
    if length > n_samples:
        audio = audio[:, :n_samples]
    elif length < n_samples:
        audio = jnp.pad(audio, ((0, 0), (0, n_samples - length)))
    half = N_FFT // 2
    padded = jnp.pad(audio, ((0, 0), (half, half)), mode="reflect")
    n_frames = n_samples // HOP_LENGTH  # the STFT has one more; Whisper drops the last
    power = _power_spectrum(_frames(padded, n_frames))  # (batch, frames, bins)
    filters = jnp.asarray(mel_filters(n_mels).astype(np.float32))  # (bins, n_mels)
    mel = jnp.einsum("bfk,km->bmf", power, filters, precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    log_spec = jnp.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
    return (log_spec + 4.0) / 4.0


log_mel = log_mel_spectrogram  # the name docs/DESIGN.md uses


def batch_features(audios: list[np.ndarray], n_mels: int = 80, n_samples: int = N_SAMPLES) -> jnp.ndarray:
    """Stack 1-D clips of any lengths (each padded/cut to `n_samples`) and return their log-mel features."""
    if len(audios) == 0:
        raise ValueError("batch_features needs at least one clip")
    stacked = np.stack([pad_or_trim(np.asarray(a, dtype=np.float32).reshape(-1), n_samples) for a in audios])
    return log_mel_spectrogram(stacked, n_mels=n_mels, n_samples=n_samples)


# ---------------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------------


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def white_noise(n: int, rng) -> np.ndarray:
    """`n` samples of unit-variance Gaussian white noise, float32. `rng`: a numpy Generator or a seed."""
    return _as_rng(rng).standard_normal(int(n)).astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float, rng) -> np.ndarray:
    """speech + scaled noise with 10*log10(P_speech / P_noise) == snr_db (powers = mean squares, float64).

    The noise is tiled/cropped to the speech length starting at a random offset drawn from `rng` (a numpy
    Generator or a seed). Returns float32, not clipped (clipping would change the SNR).
    """
    speech64 = np.asarray(speech, dtype=np.float64).reshape(-1)
    noise64 = np.asarray(noise, dtype=np.float64).reshape(-1)
    if speech64.size == 0:
        raise AudioError("cannot mix noise into empty speech (0 samples)")
    if noise64.size == 0:
        raise AudioError("cannot mix empty noise (0 samples) into speech")
    if not (np.all(np.isfinite(speech64)) and np.all(np.isfinite(noise64)) and np.isfinite(snr_db)):
        raise AudioError("cannot mix at an SNR: speech, noise or snr_db is not finite")
    offset = int(_as_rng(rng).integers(noise64.size))
    segment = noise64[(offset + np.arange(speech64.size)) % noise64.size]
    speech_power = np.mean(speech64**2)
    noise_power = np.mean(segment**2)
    if speech_power == 0.0:
        raise AudioError("cannot mix noise at an SNR into silent speech (zero power)")
    if noise_power == 0.0:
        raise AudioError("cannot mix silent noise (zero power) at an SNR")
    scale = np.sqrt(speech_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (speech64 + scale * segment).astype(np.float32)
