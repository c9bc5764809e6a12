"""dwjax.audio: loading (wav/flac/ogg/mp3, errors), log-mel vs transformers, noise mixing."""

import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import soxr

# An independent reference: a missing transformers must fail these tests, not skip them.
from transformers import WhisperFeatureExtractor

from dwjax.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    batch_features,
    load_audio,
    load_audio_bytes,
    log_mel_spectrogram,
    mel_filters,
    mix_at_snr,
    pad_or_trim,
    white_noise,
)
from dwjax.errors import AudioError

# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _chirp(sample_rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t * (1 + 0.2 * t))
    return (tone * np.minimum(1.0, 20 * t)).astype(np.float32)  # short fade-in


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def speech_clip(tmp_path_factory) -> np.ndarray:
    """A synthesized English sentence (espeak-ng, else flite), loaded through load_audio (so resampled)."""
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    text = "The quick brown fox jumps over the lazy dog, and distillation makes whisper faster."
    if shutil.which("espeak-ng"):
        _run("espeak-ng", "-w", str(path), text)
    elif shutil.which("flite"):
        _run("flite", "-t", text, "-o", str(path))
    else:
        pytest.fail("neither espeak-ng nor flite is installed; one is needed to synthesize a test clip")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) > SAMPLE_RATE
    return audio


# ---------------------------------------------------------------------------------------------------------------
# log-mel
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    ours = mel_filters(n_mels)
    assert ours.shape == (201, n_mels) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_transformers(n_mels, speech_clip):
    rng = np.random.default_rng(n_mels)
    clips = [
        (0.1 * rng.standard_normal(N_SAMPLES)).astype(np.float32),  # exactly 30 s of noise
        speech_clip,  # a few seconds: zero-padded
        np.tile(speech_clip, int(np.ceil(35 * SAMPLE_RATE / len(speech_clip))))[: 35 * SAMPLE_RATE],  # 35 s: cut
        (0.05 * rng.standard_normal(7 * SAMPLE_RATE + 123)).astype(np.float32),  # short noise, odd length
        np.zeros(SAMPLE_RATE, np.float32),  # silence: the per-example clamp must not see the other clips
    ]
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    expected = extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
    ours = np.asarray(batch_features(clips, n_mels=n_mels))
    assert ours.shape == (len(clips), n_mels, N_FRAMES) and ours.dtype == np.float32
    assert expected.shape == ours.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_log_mel_pads_and_trims_inside_jax(speech_clip):
    """Unpadded 1-D and longer-than-30-s inputs give the same features as numpy pad_or_trim first."""
    long = np.tile(speech_clip, int(np.ceil(31 * SAMPLE_RATE / len(speech_clip))))[: 31 * SAMPLE_RATE]
    direct = np.asarray(log_mel_spectrogram(long))
    assert direct.shape == (1, 80, N_FRAMES)
    np.testing.assert_allclose(direct, np.asarray(batch_features([long])), rtol=0, atol=1e-6)
    short = np.asarray(log_mel_spectrogram(speech_clip[None, :]))
    np.testing.assert_allclose(short, np.asarray(batch_features([speech_clip])), rtol=0, atol=1e-6)


def test_pad_or_trim():
    x = np.arange(10, dtype=np.float64)
    padded = pad_or_trim(x, 15)
    assert padded.dtype == np.float32 and padded.shape == (15,)
    assert np.array_equal(padded[:10], x) and not padded[10:].any()
    assert np.array_equal(pad_or_trim(x, 4), x[:4])
    assert pad_or_trim(np.ones((3, 7)), 5).shape == (3, 5)
    assert pad_or_trim(np.ones((3, 7)), 9).shape == (3, 9)


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """orig.wav (float, 22.05 kHz) and its wav/flac/ogg (sox) and mp3 (ffmpeg, gapless) encodings."""
    folder = tmp_path_factory.mktemp("formats")
    rate = 22050
    signal = _chirp(rate, 1.5)
    source = folder / "orig.wav"
    soundfile.write(source, signal, rate, subtype="FLOAT")
    files = {}
    for ext in ("wav", "flac", "ogg"):
        files[ext] = folder / f"clip.{ext}"
        _run("sox", str(source), *(["-b", "16"] if ext == "wav" else []), str(files[ext]))
    files["mp3"] = folder / "clip.mp3"  # ffmpeg writes the LAME gapless header, so no encoder delay
    _run("ffmpeg", "-loglevel", "error", "-y", "-i", str(source), "-b:a", "128k", str(files["mp3"]))
    return signal, rate, files


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_load_formats(encoded, ext):
    signal, rate, files = encoded
    reference = soxr.resample(signal, rate, SAMPLE_RATE, quality="HQ")
    audio = load_audio(files[ext])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(reference)) <= 2
    n = min(len(audio), len(reference))
    assert np.corrcoef(audio[:n], reference[:n])[0, 1] > 0.99
    from_bytes = load_audio_bytes(files[ext].read_bytes())
    np.testing.assert_array_equal(from_bytes, audio)


def test_load_stereo_44k_to_mono_16k(tmp_path):
    rate, seconds = 44100, 2.0
    left = _chirp(rate, seconds)
    right = 0.5 * np.roll(left, 37)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, np.stack([left, right], axis=1), rate)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (int(seconds * SAMPLE_RATE),)
    stored, _ = soundfile.read(path, dtype="float32")
    reference = soxr.resample(stored.mean(axis=1), rate, SAMPLE_RATE, quality="HQ")
    np.testing.assert_allclose(audio, reference, rtol=0, atol=1e-5)
    # a different target rate is honoured
    assert load_audio(path, sample_rate=8000).shape == (int(seconds * 8000),)


def test_silence_is_allowed(tmp_path):
    path = tmp_path / "silence.wav"
    soundfile.write(path, np.zeros(SAMPLE_RATE // 2, np.float32), SAMPLE_RATE)
    audio = load_audio(path)
    assert audio.shape == (SAMPLE_RATE // 2,) and not audio.any()


def _wav_bytes(samples: np.ndarray, subtype: str = "FLOAT") -> bytes:
    import io

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype=subtype)
    return buffer.getvalue()


BAD_FILES = {
    "corrupt": b"RIFF\x00\x00\x00\x00WAVEthis is not audio at all" + bytes(range(256)) * 4,
    "text": b"hello, I am a text file pretending to be audio\n",
    "empty_samples": _wav_bytes(np.zeros(0, np.float32)),
    "nan": _wav_bytes(np.array([0.0, 0.5, np.nan, 0.1] * 100, np.float32)),
    "inf": _wav_bytes(np.array([0.0, np.inf, -0.2] * 100, np.float32)),
}
EXPECTED_WORDS = {
    "corrupt": "cannot decode",
    "text": "cannot decode",
    "empty_samples": "empty",
    "nan": "non-finite",
    "inf": "non-finite",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_audio_error(tmp_path, case):
    path = tmp_path / f"bad_{case}.wav"
    path.write_bytes(BAD_FILES[case])
    with pytest.raises(AudioError) as info:
        load_audio(path)
    message = str(info.value)
    assert str(path) in message and EXPECTED_WORDS[case] in message and "\n" not in message
    with pytest.raises(AudioError) as info:
        load_audio_bytes(BAD_FILES[case], name=f"row-{case}")
    message = str(info.value)
    assert f"row-{case}" in message and EXPECTED_WORDS[case] in message and "\n" not in message


def test_missing_file_and_directory_raise_audio_error(tmp_path):
    missing = tmp_path / "nowhere" / "missing.flac"
    with pytest.raises(AudioError, match="does not exist") as info:
        load_audio(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(AudioError) as info:
        load_audio(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(AudioError, match="empty"):
        load_audio_bytes(b"")


# ---------------------------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------------------------


def _snr_db(speech, mixed) -> float:
    speech = np.asarray(speech, np.float64)
    noise = np.asarray(mixed, np.float64) - speech
    return 10.0 * np.log10(np.mean(speech**2) / np.mean(noise**2))


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 7.5, 20.0, 40.0])
@pytest.mark.parametrize("noise_seconds", [0.3, 5.0])  # shorter (tiled) and longer (cropped) than the speech
def test_mix_at_snr(snr_db, noise_seconds):
    speech = _chirp(SAMPLE_RATE, 2.0)
    noise = white_noise(int(noise_seconds * SAMPLE_RATE), np.random.default_rng(1)) * 0.37
    mixed = mix_at_snr(speech, noise, snr_db, np.random.default_rng(2))
    assert mixed.dtype == np.float32 and mixed.shape == speech.shape
    assert abs(_snr_db(speech, mixed) - snr_db) < 0.01
    # deterministic for a given rng state; a different state picks another noise offset
    assert np.array_equal(mixed, mix_at_snr(speech, noise, snr_db, np.random.default_rng(2)))
    if noise_seconds > 2.0:
        assert not np.array_equal(mixed, mix_at_snr(speech, noise, snr_db, np.random.default_rng(3)))


def test_mix_at_snr_rejects_silence():
    speech = _chirp(SAMPLE_RATE, 0.5)
    with pytest.raises(AudioError):
        mix_at_snr(np.zeros_like(speech), white_noise(100, 0), 10.0, np.random.default_rng(0))
    with pytest.raises(AudioError):
        mix_at_snr(speech, np.zeros(100, np.float32), 10.0, np.random.default_rng(0))
    with pytest.raises(AudioError):
        mix_at_snr(speech, np.zeros(0, np.float32), 10.0, np.random.default_rng(0))


def test_white_noise():
    noise = white_noise(48000, np.random.default_rng(5))
    assert noise.dtype == np.float32 and noise.shape == (48000,)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02
    assert np.array_equal(noise, white_noise(48000, np.random.default_rng(5)))
    assert np.array_equal(white_noise(10, 7), white_noise(10, 7))
