"""Speculative decoding gives the main model's own greedy output exactly (per row, any k, batch 1 and 4)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwjax.decoding.generate import Generator
from dwjax.decoding.rules import DecodeSpec
from dwjax.decoding.speculative import SpeculativeGenerator, speculative_loop
from dwjax.models.configs import WhisperConfig
from dwjax.models.student import make_student
from dwjax.models.whisper import Whisper, init_params

VOCAB = 600
EOT, SOT, NO_TS, TS_BEGIN = 500, 501, 507, 508
CFG = WhisperConfig(n_mels=16, n_audio_ctx=24, n_text_ctx=96, d_model=64, encoder_layers=1, decoder_layers=4,
                    encoder_heads=4, decoder_heads=4, ffn_dim=128, vocab_size=VOCAB)


def tiny_spec(timestamps=False):
    return DecodeSpec(eot=EOT, sot=SOT, no_speech=506, no_timestamps=NO_TS, timestamp_begin=TS_BEGIN,
                      vocab_size=VOCAB, suppress=(1, 2, 7, 502, 503, 504, 505, 506, 501),
                      begin_suppress=(220, EOT), timestamps=timestamps, max_initial_timestamp_index=20)


@functools.lru_cache(maxsize=1)
def build_models():
    params = init_params(CFG, jax.random.PRNGKey(3))
    # peakier logits than the 0.02 init, and an EOT logit that swings, so that rows end at different lengths
    emb = np.array(params["decoder"]["embed_tokens"]["embedding"])
    rng = np.random.default_rng(0)
    emb = rng.standard_normal(emb.shape).astype(np.float32) * 0.6
    emb[EOT] *= 2.5
    params["decoder"]["embed_tokens"]["embedding"] = jnp.asarray(emb)
    params["decoder"]["embed_positions"] = jnp.asarray(rng.standard_normal((CFG.n_text_ctx, CFG.d_model)) * 0.3,
                                                       jnp.float32)
    # random layers that matter (the 0.02 init leaves the residual stream ~ the input embedding: a model that
    # repeats its input token)
    params["decoder"]["layers"] = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 6.0 if "kernel" in jax.tree_util.keystr(path) else x, params["decoder"]["layers"])
    s_cfg, s_params = make_student(CFG, params, decoder_layer_ids=[0, CFG.decoder_layers - 1])
    return params, s_cfg, s_params


@pytest.fixture(scope="module")
def models():
    return build_models()


def generators(models, timestamps):
    params, s_cfg, s_params = models
    spec = tiny_spec(timestamps)
    teacher = Generator(Whisper(CFG, scan_layers=True), params, spec)
    student = Generator(Whisper(s_cfg, scan_layers=True), s_params, spec)
    return teacher, student


def enc_out(b, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, CFG.n_audio_ctx, CFG.d_model), jnp.float32)


@pytest.mark.parametrize("b, timestamps, ks", [
    (4, False, (3,)), (4, True, (3,)),
    pytest.param(1, False, (1, 3, 5), marks=pytest.mark.slow), pytest.param(4, False, (1, 5), marks=pytest.mark.slow)])
def test_equals_teacher_greedy(models, b, timestamps, ks):
    teacher, student = generators(models, timestamps)
    assert SpeculativeGenerator(teacher, student).share_encoder
    prompt = [SOT] if timestamps else [SOT, NO_TS]
    enc = enc_out(b, seed=1)
    ref = teacher.generate(enc, prompt, max_new_tokens=40)
    assert len(set(ref.lengths.tolist())) > 1 or b == 1 or timestamps
    for k in ks:
        spec_gen = SpeculativeGenerator(teacher, student, k=k)
        out, stats = spec_gen.generate(enc, enc, prompt, max_new_tokens=40)
        for i in range(b):
            assert out.sequences()[i] == ref.sequences()[i], (k, i)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_allclose(out.sum_logprob, ref.sum_logprob, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out.no_speech_prob, ref.no_speech_prob, rtol=1e-5, atol=1e-6)
        assert (stats["accepted"] <= stats["drafted"]).all()


@pytest.mark.parametrize("b, seed, k", [(2, 7, 4), (4, 1, 3)])
def test_teacher_as_its_own_assistant_accepts_everything(models, b, seed, k):
    """The main model drafting for itself: its drafts are its own greedy tokens, so every draft of every round is
    accepted (the drafts past a row's EOT or its token limit too: the verify pass predicts the same tokens there),
    each round commits k + 1 tokens, and the output is the plain greedy decoding of the same model."""
    teacher, _ = generators(models, False)
    L = 30
    enc = enc_out(b, seed=seed)
    ref = teacher.generate(enc, [SOT, NO_TS], max_new_tokens=L)
    assert len(set(ref.lengths.tolist())) > 1      # a row that ends early and one that runs to the limit
    out, stats = SpeculativeGenerator(teacher, teacher, k=k).generate(enc, enc, [SOT, NO_TS], max_new_tokens=L)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    assert out.sequences() == ref.sequences()
    np.testing.assert_allclose(out.sum_logprob, ref.sum_logprob, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.no_speech_prob, ref.no_speech_prob, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats["accepted"], stats["drafted"])
    # the first token comes from the prefill; a row is done once it holds its EOT (generated index = length) or
    # L tokens, and each round adds k + 1 of them: ceil(length / (k + 1)) rounds, ceil((L - 1) / (k + 1)) at L
    lengths = ref.lengths.astype(int)
    want_rounds = np.where(lengths < L, -(-lengths // (k + 1)), -(-(L - 1) // (k + 1)))
    np.testing.assert_array_equal(stats["rounds"], want_rounds)
    np.testing.assert_array_equal(stats["drafted"], k * want_rounds)
    assert int(stats["batch_rounds"]) == want_rounds.max()


def test_adaptive_k_and_different_encoder(models):
    params, s_cfg, s_params = models
    teacher, _ = generators(models, False)
    other = init_params(s_cfg, jax.random.PRNGKey(11))
    other["decoder"] = s_params["decoder"]
    student = Generator(Whisper(s_cfg, scan_layers=True), other, tiny_spec())
    sg = SpeculativeGenerator(teacher, student, k=6, adaptive=True)
    assert not sg.share_encoder
    mel = jax.random.normal(jax.random.PRNGKey(2), (3, CFG.n_mels, 2 * CFG.n_audio_ctx))
    t_enc, s_enc = sg.encode(mel)
    ref = teacher.generate(t_enc, [SOT, NO_TS], max_new_tokens=40)
    out, _ = sg.generate(t_enc, s_enc, [SOT, NO_TS], max_new_tokens=40)
    np.testing.assert_array_equal(out.tokens, ref.tokens)


@pytest.mark.slow
def test_builtin_tiny_en_with_its_own_two_layer_slice(tmp_path):
    """tiny.en as the main model, its decoder layers [0, 3] as the assistant: the same tokens as tiny.en greedy."""
    from dwjax.decoding.speculative import SpeculativeTranscriber
    from dwjax.decoding.transcribe import Transcriber
    from dwjax.weights.loading import LoadedModel, load_model
    from tests.helpers import synthesize
    clips = [a for _, a in synthesize(tmp_path, 4)]
    teacher = load_model("builtin:whisper-tiny.en")
    s_cfg, s_params = make_student(teacher.cfg, teacher.params, decoder_layers=2)
    student = LoadedModel(s_cfg, s_params, teacher.tokenizer, teacher.generation, "slice")
    tr = Transcriber(teacher, batch_size=4)
    fast = SpeculativeTranscriber(tr, student, k=4)
    assert fast.engine.share_encoder
    ref = tr.transcribe(clips)
    got = fast.transcribe(clips)
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    assert 0 <= fast.stats.acceptance_rate <= 1 and fast.stats.teacher_forwards > 0
    ref_ts = tr.transcribe(clips[:2], timestamps=True)
    got_ts = fast.transcribe(clips[:2], timestamps=True)
    assert [r.tokens for r in got_ts] == [r.tokens for r in ref_ts]
