"""dwjax.weights: CTranslate2 model.bin round trip, the names table (from_dwjax -> to_dwjax identity for every
format), and load_model's errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dwjax.errors import WeightsError
from dwjax.models.configs import WhisperConfig
from dwjax.models.whisper import init_params
from dwjax.weights import ctranslate2, names
from dwjax.weights.loading import load_model
from dwjax.weights.tokenizer_files import write_vocabulary

CFG = WhisperConfig(n_mels=80, n_audio_ctx=8, n_text_ctx=16, d_model=32, encoder_layers=2, decoder_layers=3,
                    encoder_heads=2, decoder_heads=4, ffn_dim=64, vocab_size=51865)


@pytest.fixture(scope="module")
def params():
    import jax
    p = init_params(CFG, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    # every leaf random (zeros/ones from the initialisers would hide layout mistakes)
    return jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32), p)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


@pytest.mark.parametrize("fmt", ["hf", "openai", "ctranslate2"])
def test_names_round_trip(params, fmt):
    ext = names.from_dwjax(params, CFG, fmt)
    back = names.to_dwjax(ext, CFG, fmt)
    a, b = _flat(params), _flat(back)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    if fmt == "hf":
        assert ext["proj_out.weight"] is ext["model.decoder.embed_tokens.weight"] or np.array_equal(
            ext["proj_out.weight"], ext["model.decoder.embed_tokens.weight"])
    if fmt == "ctranslate2":  # the fused key-bias blocks are zeros
        d = CFG.d_model
        np.testing.assert_array_equal(ext["encoder/layer_0/self_attention/linear_0/bias"][d:2 * d], 0)
        np.testing.assert_array_equal(ext["decoder/layer_2/attention/linear_1/bias"][:d], 0)


def test_hf_names_match_transformers(params):
    """Every hf name from_dwjax writes is a transformers WhisperForConditionalGeneration tensor of that shape."""
    from tests.helpers import hf_config
    from transformers import WhisperForConditionalGeneration
    sd = WhisperForConditionalGeneration(hf_config(CFG)).state_dict()
    ext = names.from_dwjax(params, CFG, "hf")
    assert set(ext) == set(sd)
    for k, v in ext.items():
        assert tuple(sd[k].shape) == v.shape, k


def test_ctranslate2_write_read_round_trip(tmp_path, params):
    tensors = names.from_dwjax(params, CFG, "ctranslate2")
    tensors["encoder/num_heads"] = np.asarray(CFG.encoder_heads, np.int8)
    tensors["decoder/num_heads"] = np.asarray(CFG.decoder_heads, np.int8)
    tensors["half"] = np.arange(6, dtype=np.float16).reshape(2, 3)
    tensors["ints"] = np.arange(4, dtype=np.int32)
    path = tmp_path / "model.bin"
    ctranslate2.write_model_bin(path, "WhisperSpec", tensors)
    spec, back = ctranslate2.read_model_bin(path)
    assert spec == "WhisperSpec"
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].size == v.size, k
        if v.ndim:  # scalars: see test_ctranslate2_scalar_keeps_rank_0
            assert back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k].reshape(v.shape), v, err_msg=k)
    # split files read as one stream
    data = path.read_bytes()
    (tmp_path / "a").write_bytes(data[:1000])
    (tmp_path / "b").write_bytes(data[1000:])
    _, split = ctranslate2.read_split([tmp_path / "a", tmp_path / "b"])
    np.testing.assert_array_equal(split["decoder/embeddings/weight"], tensors["decoder/embeddings/weight"])


def test_ctranslate2_scalar_keeps_rank_0(tmp_path):
    ctranslate2.write_model_bin(tmp_path / "model.bin", "WhisperSpec", {"n": np.asarray(6, np.int8)})
    assert ctranslate2.read_model_bin(tmp_path / "model.bin")[1]["n"].shape == ()


@pytest.fixture(scope="module")
def ct2_dir(tmp_path_factory, params):
    """A complete CTranslate2 model directory (random weights, the builtin base vocabulary)."""
    base = load_model("builtin:whisper-base")
    d = tmp_path_factory.mktemp("ct2")
    tensors = names.from_dwjax(params, CFG, "ctranslate2")
    tensors["encoder/num_heads"] = np.asarray(CFG.encoder_heads, np.int8)
    tensors["decoder/num_heads"] = np.asarray(CFG.decoder_heads, np.int8)
    ctranslate2.write_model_bin(d / "model.bin", "WhisperSpec", tensors)
    (d / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [220, 50257]}))
    write_vocabulary(base.tokenizer, d)
    assert (d / "vocabulary.txt").exists() or (d / "vocabulary.json").exists()
    return d


def test_load_ct2_directory(ct2_dir, params):
    m = load_model(str(ct2_dir))
    assert m.cfg.replace(n_text_ctx=CFG.n_text_ctx) == CFG
    a, b = _flat(params), _flat(m.params)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert m.generation["suppress_ids"] == [1, 2]


def test_unknown_builtin():
    with pytest.raises(WeightsError, match=r"unknown builtin model 'builtin:whisper-huge'.*builtin:whisper-tiny\.en"):
        load_model("builtin:whisper-huge")


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(str(tmp_path / "nowhere"))


def test_directory_that_is_no_model(tmp_path):
    with pytest.raises(WeightsError, match="not a model directory"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("missing", ["vocabulary.txt", "config.json"])
def test_ct2_directory_missing_file(tmp_path, ct2_dir, missing):
    d = tmp_path / "m"
    shutil.copytree(ct2_dir, d)
    for f in d.glob(missing.replace(".txt", ".*") if missing.startswith("vocabulary") else missing):
        f.unlink()
    with pytest.raises(WeightsError, match=f"missing {missing}"):
        load_model(str(d))


@pytest.mark.parametrize("keep", [0.5, 0.999, 10])
def test_truncated_model_bin(tmp_path, ct2_dir, keep):
    d = tmp_path / "m"
    shutil.copytree(ct2_dir, d)
    data = (d / "model.bin").read_bytes()
    n = int(len(data) * keep) if keep < 1 else keep
    (d / "model.bin").write_bytes(data[:n])
    with pytest.raises(WeightsError, match="truncated|not a CTranslate2"):
        load_model(str(d))
