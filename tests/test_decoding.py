"""dwjax.decoding against transformers' Whisper generate: greedy (with and without timestamps) and beam search on
tiny random models and on the builtin teachers; bf16, compile counts, language detection, sampling seeds."""
from __future__ import annotations

import numpy as np
import pytest

# independent references: a missing transformers/torch must fail these tests, not skip them
import torch  # noqa: F401
import transformers  # noqa: F401

import jax.numpy as jnp

from dwjax.audio import batch_features
from dwjax.decoding.generate import Generator
from dwjax.decoding.rules import DecodeSpec
from dwjax.models.configs import WhisperConfig
from dwjax.models.whisper import Whisper
from dwjax.weights.loading import load_model
from tests import helpers as H

MAX_NEW = 10

# (d_model, enc layers, dec layers, enc heads, dec heads, n_mels, vocab)
RANDOM_SHAPES = {
    "en-d64": (64, 2, 2, 2, 4, 80, 51864),
    "multi-d96-mel128": (96, 1, 3, 6, 6, 128, 51865),
    "v3-d64": (64, 3, 1, 4, 2, 80, 51866),
}


def _cfg(shape) -> WhisperConfig:
    d, el, dl, eh, dh, mels, vocab = shape
    return WhisperConfig(n_mels=mels, n_audio_ctx=16, n_text_ctx=48, d_model=d, encoder_layers=el,
                         decoder_layers=dl, encoder_heads=eh, decoder_heads=dh, ffn_dim=2 * d, vocab_size=vocab)


class RandomCase:
    """A random tiny model in both libraries, 3 inputs, and a Generator; the EOT row is calibrated so that some rows
    end early and one runs to MAX_NEW."""

    def __init__(self, name, seed):
        self.cfg = cfg = _cfg(RANDOM_SHAPES[name])
        self.hf, params = H.random_hf_model(cfg, seed=seed, embed_std=0.1)
        rng = np.random.default_rng(seed)
        self.mel = rng.standard_normal((3, cfg.n_mels, 2 * cfg.n_audio_ctx)).astype(np.float32)
        self.model = Whisper(cfg)
        self.spec = H.random_spec(cfg.vocab_size)
        self.gen = Generator(self.model, params, self.spec)
        self.margin = H.calibrate_eot(self.hf, self.gen, self.mel, self.prompt(False), MAX_NEW)
        self.enc = self.gen.encode(self.mel)

    def prompt(self, timestamps):
        return H.prompt_for(self.cfg.vocab_size, timestamps)

    def spec_for(self, timestamps):
        return H.dataclasses_replace(self.spec, timestamps=timestamps)


_CASES: dict = {}


def _case(name) -> RandomCase:
    if name not in _CASES:
        _CASES[name] = RandomCase(name, seed=list(RANDOM_SHAPES).index(name))
    return _CASES[name]


@pytest.fixture(scope="module", params=list(RANDOM_SHAPES))
def case(request):
    return _case(request.param)


@pytest.fixture(scope="module")
def en_case():
    return _case("en-d64")


@pytest.mark.parametrize("timestamps", [False, True], ids=["notimestamps", "timestamps"])
def test_greedy_matches_transformers_random(case, timestamps):
    out = case.gen.generate(case.enc, case.prompt(timestamps), max_new_tokens=MAX_NEW, timestamps=timestamps)
    ref = H.hf_generate(case.hf, case.mel, case.spec_for(timestamps), case.cfg.vocab_size, MAX_NEW, timestamps)
    assert out.sequences() == ref
    if not timestamps:  # the calibrated EOT: both kinds of rows are exercised
        assert case.margin > 0.5, case.margin
        assert out.lengths.tolist() == [2, MAX_NEW, MAX_NEW // 2], out.lengths
    else:
        assert all(t >= case.spec.timestamp_begin for t in out.tokens[:, 0])


@pytest.mark.parametrize("timestamps", [False, True], ids=["notimestamps", "timestamps"])
def test_bucketed_cache_matches_full_cache_and_transformers(case, timestamps):
    """decode_loop grows its self-attention cache through buckets; tiny buckets (from 4 positions, doubling, crossed within
    MAX_NEW tokens) give transformers' tokens, and the full cache's tokens and log-probabilities."""
    import jax

    from dwjax.decoding.generate import cache_buckets, decode_loop
    prompt = jnp.asarray(np.broadcast_to(case.prompt(timestamps), (3, len(case.prompt(timestamps)))))
    spec = case.spec_for(timestamps)
    assert len(cache_buckets(prompt.shape[1], MAX_NEW, 4)) >= 2   # the loop grows its cache at least once
    run = jax.jit(lambda params, enc, first: decode_loop(case.model, spec, params, enc, prompt, MAX_NEW,
                                                         first_bucket=first), static_argnums=2)
    bucketed, full = (jax.device_get(run(case.gen.params, case.enc, first)) for first in (4, 0))
    np.testing.assert_array_equal(bucketed["tokens"], full["tokens"])
    np.testing.assert_array_equal(bucketed["lengths"], full["lengths"])
    np.testing.assert_allclose(bucketed["sum_logprob"], full["sum_logprob"], rtol=1e-6, atol=1e-6)
    ref = H.hf_generate(case.hf, case.mel, spec, case.cfg.vocab_size, MAX_NEW, timestamps)
    assert [row[:n].tolist() for row, n in zip(bucketed["tokens"], bucketed["lengths"])] == ref


def test_row_limit_stops_only_the_rows_that_reach_it(en_case):
    """decode_loop's per-row `limit` (the pseudo-labeller's runaway stop): a row stops after `limit` tokens, with
    exactly the tokens and log-probability of a decoding whose budget is that limit; rows that end earlier are
    what transformers' greedy decoding gives."""
    import jax

    from dwjax.decoding.generate import decode_loop
    c = en_case
    prompt = jnp.asarray(np.broadcast_to(c.prompt(False), (3, len(c.prompt(False)))))
    run = jax.jit(lambda params, enc, limit, n: decode_loop(c.model, c.spec, params, enc, prompt, n, limit=limit),
                  static_argnums=3)
    # unlimited lengths are [2, MAX_NEW, MAX_NEW // 2] (test_greedy_matches_transformers_random): limit row 1 only
    limited = jax.device_get(run(c.gen.params, c.enc, jnp.asarray([MAX_NEW // 2, 4, MAX_NEW], jnp.int32), MAX_NEW))
    assert limited["lengths"].tolist() == [2, 4, MAX_NEW // 2]
    ref = H.hf_generate(c.hf, c.mel, c.spec, c.cfg.vocab_size, MAX_NEW, False)
    assert [row[:n].tolist() for row, n in zip(limited["tokens"], limited["lengths"])] == [ref[0], ref[1][:4], ref[2]]
    assert (limited["tokens"][1, 4:] == c.spec.eot).all()
    budget4 = jax.device_get(run(c.gen.params, c.enc, None, 4))
    np.testing.assert_array_equal(limited["tokens"][1, :4], budget4["tokens"][1])
    np.testing.assert_allclose(limited["sum_logprob"][1], budget4["sum_logprob"][1], rtol=1e-6)
    unlimited = jax.device_get(run(c.gen.params, c.enc, None, MAX_NEW))
    np.testing.assert_allclose(limited["sum_logprob"][[0, 2]], unlimited["sum_logprob"][[0, 2]], rtol=1e-6)


def test_beam1_equals_greedy(en_case):
    c = en_case
    greedy = c.gen.generate(c.enc, c.prompt(False), max_new_tokens=MAX_NEW)
    beam = c.gen.beam_search(c.enc, c.prompt(False), max_new_tokens=MAX_NEW, num_beams=1)
    assert beam.sequences() == greedy.sequences()
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)


@pytest.mark.parametrize("timestamps", [False, True], ids=["notimestamps", "timestamps"])
def test_beam3_matches_transformers_random(en_case, timestamps):
    c = en_case
    spec = c.spec_for(timestamps)
    out = c.gen.beam_search(c.enc, c.prompt(timestamps), max_new_tokens=MAX_NEW, num_beams=3, timestamps=timestamps)
    ref = H.hf_generate(c.hf, c.mel, spec, c.cfg.vocab_size, MAX_NEW, timestamps, num_beams=3)
    assert out.sequences() == ref
    assert np.all(np.isfinite(out.sum_logprob)) and np.all(out.sum_logprob <= 0)


def test_sampling_reproducible_per_seed(en_case):
    c = en_case
    a = c.gen.generate(c.enc, c.prompt(False), max_new_tokens=MAX_NEW, temperature=1.0, seed=3)
    b = c.gen.generate(c.enc, c.prompt(False), max_new_tokens=MAX_NEW, temperature=1.0, seed=3)
    d = c.gen.generate(c.enc, c.prompt(False), max_new_tokens=MAX_NEW, temperature=1.0, seed=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.sum_logprob, b.sum_logprob)
    assert not np.array_equal(a.tokens, d.tokens)


def test_compilations_do_not_grow_for_same_bucket(en_case):
    c = en_case
    c.gen.generate(c.enc, c.prompt(False), max_new_tokens=MAX_NEW)
    before = c.gen.compilations
    c.gen.generate(c.enc, c.prompt(False), max_new_tokens=MAX_NEW)
    c.gen.encode(c.mel)
    assert c.gen.compilations == before


# ---------------------------------------------------------------------------------------------------------------
# the builtin teachers on synthesised speech
# ---------------------------------------------------------------------------------------------------------------

N_UTTERANCES = 24
BATCH = 8
MAX_NEW_REAL = 64


@pytest.fixture(scope="module")
def utterances(tmp_path_factory):
    return H.synthesize(tmp_path_factory.mktemp("utts"), N_UTTERANCES)


class Teacher:
    def __init__(self, name):
        self.loaded = m = load_model(name)
        self.cfg = m.cfg
        self.spec = DecodeSpec.for_model(m.tokenizer, m.generation, m.cfg.vocab_size)
        self.prompt = m.tokenizer.sot_sequence("en" if m.cfg.is_multilingual else None)
        self.model = Whisper(m.cfg)
        self.gen = Generator(self.model, m.params, self.spec)
        self._hf = None

    @property
    def hf(self):
        if self._hf is None:
            self._hf = H.hf_from_dwjax(self.loaded.params, self.cfg)
        return self._hf

    def dwjax_tokens(self, feats, gen=None):
        gen = gen or self.gen
        rows = []
        for i in range(0, len(feats), BATCH):
            out = gen.generate(gen.encode(feats[i:i + BATCH]), self.prompt, max_new_tokens=MAX_NEW_REAL)
            rows += out.sequences()
        return rows

    def hf_tokens(self, feats):
        rows = []
        for i in range(0, len(feats), BATCH):
            rows += H.hf_generate(self.hf, np.asarray(feats[i:i + BATCH]), self.spec, self.cfg.vocab_size,
                                  MAX_NEW_REAL, False, prompt_len=len(self.prompt))
        return rows


@pytest.fixture(scope="module")
def tiny_en():
    return Teacher("builtin:whisper-tiny.en")


@pytest.fixture(scope="module")
def base():
    return Teacher("builtin:whisper-base")


def _features(utts, n_mels=80):
    return np.asarray(batch_features([a for _, a in utts], n_mels=n_mels))


@pytest.mark.parametrize("teacher", ["tiny_en", pytest.param("base", marks=pytest.mark.slow)])
def test_greedy_matches_transformers_teachers(request, teacher, utterances):
    t = request.getfixturevalue(teacher)
    feats = _features(utterances)
    ours, ref = t.dwjax_tokens(feats), t.hf_tokens(feats)
    tok = t.loaded.tokenizer
    diffs = [(tok.decode(a), tok.decode(b)) for a, b in zip(ours, ref) if a != b]
    assert not diffs, diffs
    # sanity: the transcripts are English and mostly right
    from dwjax.text.wer import wer
    hyp = [tok.decode(a) for a in ours]
    assert wer([s for s, _ in utterances], hyp) < 0.35


@pytest.mark.slow
def test_bf16_transcripts_match_fp32(tiny_en, utterances):
    feats = _features(utterances)
    fp32 = tiny_en.dwjax_tokens(feats)
    gen16 = Generator(Whisper(tiny_en.cfg, dtype=jnp.bfloat16), tiny_en.loaded.params, tiny_en.spec)
    bf16 = tiny_en.dwjax_tokens(feats, gen16)
    tok = tiny_en.loaded.tokenizer
    same = sum(tok.decode(a).strip() == tok.decode(b).strip() for a, b in zip(fp32, bf16))
    assert same >= 0.9 * len(fp32), (same, len(fp32))


def test_language_detection_base(base, utterances):
    feats = _features(utterances[:BATCH])
    langs = base.loaded.tokenizer.languages
    codes, ids = list(langs), list(langs.values())
    picked = base.gen.detect_language(base.gen.encode(feats), ids)
    assert [codes[i] for i in picked] == ["en"] * len(feats)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["tiny_en", "base"])
def test_greedy_matches_transformers_real_clips(request, teacher):
    clips = H.real_clips(100)
    if not clips:
        pytest.skip(f"{H.REAL_MANIFEST} is not present")
    t = request.getfixturevalue(teacher)
    feats = _features(clips)
    ours, ref = t.dwjax_tokens(feats), t.hf_tokens(feats)
    tok = t.loaded.tokenizer
    diffs = [(tok.decode(a), tok.decode(b)) for a, b in zip(ours, ref) if a != b]
    assert not diffs, diffs
