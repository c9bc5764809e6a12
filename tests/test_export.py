"""`dwjax export`: transformers, CTranslate2 (faster-whisper) and OpenAI files that those tools load and that give
the same numbers and transcripts as dwjax. Real weights: builtin:whisper-tiny.en (base + a student: slow)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dwjax.errors import UserError, WeightsError  # noqa: E402
from dwjax.weights import export as ex  # noqa: E402
from dwjax.weights.loading import LoadedModel, load_model  # noqa: E402

N_CLIPS = 24
MAX_NEW = 48
N_LOGITS = 4      # clips whose teacher-forced logits are compared (CPU time)
N_STUDENT = 6
TEACHER = "builtin:whisper-tiny.en"


# --------------------------------------------------------------------------------------------- helpers
def _reference(module: str, pip_name: str):
    """Import an independent reference (the tool the exported files are for). Missing, the test fails, never skips
    (tests/helpers.py): a skipped comparison would pass an export nothing has checked."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{pip_name} is the independent reference of this test and is not importable "
                    f"({type(e).__name__}: {e}); pip install {pip_name}", pytrace=False)


def _load(name: str) -> LoadedModel:
    """A builtin model; missing weights fail the test (the comparisons need real weights)."""
    try:
        return load_model(name)
    except WeightsError as e:
        pytest.fail(f"{name}: {e}", pytrace=False)


def _synthesise(directory, n: int) -> tuple[list[np.ndarray], list[str]]:
    """n short utterances spoken by flite / espeak-ng voices (tests/helpers.py): (16 kHz audios, sentences).
    flite and espeak-ng are Debian system tools (run_scripts/setup.sh installs them; pip cannot), and the suite
    skips without them elsewhere too (tests/test_multilingual.py, test_data_demo.py, test_packing.py): the one
    skip kept here."""
    if shutil.which("flite") is None or shutil.which("espeak-ng") is None:
        pytest.skip("needs flite and espeak-ng")
    from tests.helpers import synthesize
    pairs = synthesize(directory, n)
    return [a for _, a in pairs], [t for t, _ in pairs]


def _student(teacher: LoadedModel) -> LoadedModel:
    """Two decoder layers: the teacher's first and last (stacked layer axis sliced)."""
    import jax
    n = teacher.cfg.decoder_layers
    keep = np.array([0, n - 1])
    dec = dict(teacher.params["decoder"])
    dec["layers"] = jax.tree_util.tree_map(lambda a: np.asarray(a)[keep], dec["layers"])
    params = dict(teacher.params, decoder=dec)
    return dataclasses.replace(teacher, cfg=teacher.cfg.replace(decoder_layers=2), params=params,
                               source="student", metadata={})


class _Dwjax:
    """dwjax fp32 features, greedy transcripts and teacher-forced logits of a model."""

    def __init__(self, model: LoadedModel, audios):
        import jax.numpy as jnp
        from dwjax.audio import batch_features
        from dwjax.decoding.generate import Generator
        from dwjax.decoding.rules import DecodeSpec
        from dwjax.models.whisper import Whisper
        self.model, self.tok = model, model.tokenizer
        self.net = Whisper(model.cfg)
        self.params = __import__("jax").tree_util.tree_map(jnp.asarray, model.params)
        self.mel = np.asarray(batch_features(audios, n_mels=model.cfg.n_mels))
        spec = DecodeSpec.for_model(self.tok, model.generation, model.cfg.vocab_size)
        self.gen = Generator(self.net, self.params, spec)
        self.prompt = self.tok.sot_sequence(language="en" if self.tok.is_multilingual else None, timestamps=False)
        self.enc = self.gen.encode(self.mel)
        out = self.gen.generate(self.enc, self.prompt, max_new_tokens=MAX_NEW)
        self.sequences = out.sequences()
        self.texts = [self.tok.decode(s).strip() for s in self.sequences]

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Teacher-forced logits of the first len(tokens) clips (the encoder output of the greedy run reused)."""
        import jax.numpy as jnp
        logits, _ = self.net.apply({"params": self.params}, jnp.asarray(tokens), self.enc[: len(tokens)],
                                   method="decode")
        return np.asarray(logits)

    def forced_tokens(self, n: int = N_LOGITS, length: int = 24) -> np.ndarray:
        """prompt + the greedy tokens of the first n clips, padded with EOT to a common length."""
        rows = [(self.prompt + s)[:length] for s in self.sequences[:n]]
        return np.array([r + [self.tok.eot] * (length - len(r)) for r in rows], np.int32)


def _hf_greedy(model_dir, mel: np.ndarray, tok) -> tuple[list[str], object]:
    torch = _reference("torch", "torch")
    transformers = _reference("transformers", "transformers")
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = hf.generate(input_features=torch.from_numpy(mel.copy()), max_new_tokens=MAX_NEW, do_sample=False,
                          num_beams=1, return_timestamps=False,
                          **({"language": "en", "task": "transcribe"} if tok.is_multilingual else {}))
    seqs = out.sequences if hasattr(out, "sequences") else out
    # transformers may continue past max_new_tokens when the output holds timestamp tokens (a second segment):
    # compare the first MAX_NEW new tokens, the ones dwjax decodes
    prompt = tok.sot_sequence(language="en" if tok.is_multilingual else None, timestamps=False)
    rows = [row.tolist() for row in seqs]
    rows = [(r[len(prompt):] if r[:len(prompt)] == prompt else r)[:MAX_NEW] for r in rows]
    return [tok.decode([t for t in row if t < tok.eot]).strip() for row in rows], hf


def _hf_logits(hf, mel: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return hf(input_features=torch.from_numpy(mel[: len(tokens)].copy()), decoder_input_ids=torch.from_numpy(tokens.astype(np.int64)),
                  use_cache=False).logits.numpy()


def _assert_params(a: dict, b: dict, cast=None) -> None:
    import jax
    fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert fa.keys() == fb.keys()
    for k in fa:
        want = np.asarray(fa[k], np.float32)
        if cast is not None:
            want = want.astype(cast).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(fb[k], np.float32), want, err_msg=str(k))


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return _synthesise(tmp_path_factory.mktemp("clips"), N_CLIPS)


@pytest.fixture(scope="module")
def teacher():
    return _load(TEACHER)


@pytest.fixture(scope="module")
def ref(teacher, clips):
    return _Dwjax(teacher, clips[0])


@pytest.fixture(scope="module")
def hf_dir(teacher, tmp_path_factory):
    return ex.export_model(teacher, "hf", tmp_path_factory.mktemp("x") / "hf")


@pytest.fixture(scope="module")
def ct2_dir(teacher, tmp_path_factory):
    return ex.export_model(teacher, "ctranslate2", tmp_path_factory.mktemp("x") / "ct2")


# --------------------------------------------------------------------------------------------- transformers
def _check_hf_matches(model_dir, ref: _Dwjax, report: str, tol: float = 1e-4, tol64: float = 1e-4):
    """The exported model in transformers: greedy transcripts equal dwjax's; its float64 logits (the exported
    weights evaluated exactly) within `tol64` of dwjax's fp32 logits (dwjax's own rounding error); its fp32 logits
    within `tol` (two fp32 implementations, each with its own rounding: at base each is ~1e-4 from float64)."""
    import copy

    import torch
    texts, hf = _hf_greedy(model_dir, ref.mel, ref.tok)
    tokens = ref.forced_tokens()
    ours = ref.logits(tokens)
    diff = float(np.max(np.abs(_hf_logits(hf, ref.mel, tokens) - ours)))
    hf64 = copy.deepcopy(hf).double()
    with torch.no_grad():
        exact = hf64(input_features=torch.from_numpy(ref.mel[: len(tokens)].astype(np.float64)),
                     decoder_input_ids=torch.from_numpy(tokens.astype(np.int64)), use_cache=False).logits.numpy()
    diff64 = float(np.max(np.abs(exact - ours)))
    print(f"{report}: max |logit diff| vs transformers fp32 {diff:.2e}, vs transformers float64 {diff64:.2e}; "
          f"transcripts equal {sum(a == b for a, b in zip(texts, ref.texts))}/{len(texts)}")
    assert diff64 < tol64
    assert diff < tol
    assert texts == ref.texts
    return hf


def test_hf_matches_dwjax(hf_dir, ref, clips):
    _check_hf_matches(hf_dir, ref, "tiny.en -> hf")
    from dwjax.text.wer import wer
    assert wer(clips[1], ref.texts) < 0.4      # the synthetic speech is understood at all


def test_hf_files_and_pipeline(hf_dir, teacher, clips):
    import json
    transformers = _reference("transformers", "transformers")
    names = {p.name for p in hf_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "preprocessor_config.json",
            "vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"} <= names
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(".")]   # no temp dirs left
    g = json.loads((hf_dir / "generation_config.json").read_text())
    tok = teacher.tokenizer
    assert g["decoder_start_token_id"] == tok.sot and g["no_timestamps_token_id"] == tok.no_timestamps
    assert g["is_multilingual"] is False and g["max_initial_timestamp_index"] == 50 and g["max_length"] == 448
    assert g["alignment_heads"] == [list(h) for h in teacher.generation["alignment_heads"]]
    assert json.loads((hf_dir / "preprocessor_config.json").read_text())["feature_size"] == teacher.cfg.n_mels
    from safetensors.numpy import load_file
    assert "proj_out.weight" not in load_file(str(hf_dir / "model.safetensors"))  # tied, as transformers saves
    pipe = transformers.pipeline("automatic-speech-recognition", model=str(hf_dir))
    text = pipe(clips[0][0].copy())["text"]
    from dwjax.text.wer import wer
    assert wer(clips[1][0], text) < 0.3
    # transformers' tokenizer encodes like dwjax's
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for s in clips[1][:6] + [" Hello world, it's 3:45pm — naïve café!"]:
        assert hf_tok.encode(s, add_special_tokens=False) == tok.encode(s)


def test_hf_student_two_layers_matches(teacher, clips, tmp_path):
    student = _student(teacher)
    out = ex.export_model(student, "hf", tmp_path / "s")
    import json
    heads = json.loads((out / "generation_config.json").read_text())["alignment_heads"]
    assert heads and all(0 <= l < 2 for l, _ in heads)     # valid for 2 decoder layers
    _check_hf_matches(out, _Dwjax(student, clips[0][:N_STUDENT]), "2-layer student -> hf")


def test_hf_decoder_only_is_an_assistant(hf_dir, ref, teacher, tmp_path):
    torch = _reference("torch", "torch")
    transformers = _reference("transformers", "transformers")
    out = ex.export_model(teacher, "hf", tmp_path / "dec", decoder_only=True)
    assistant, info = transformers.WhisperForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    main = transformers.WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    mel = torch.from_numpy(ref.mel[:1].copy())
    with torch.no_grad():
        plain = main.generate(input_features=mel[:1], max_new_tokens=MAX_NEW)
        spec = main.generate(input_features=mel[:1], max_new_tokens=MAX_NEW, assistant_model=assistant.eval())
    assert plain.tolist() == spec.tolist()


# --------------------------------------------------------------------------------------------- CTranslate2
def test_faster_whisper_matches_dwjax(ct2_dir, ref, clips):
    fw = _reference("faster_whisper", "faster-whisper")
    _reference("ctranslate2", "ctranslate2")
    from dwjax.audio import pad_or_trim
    from dwjax.text.wer import wer
    model = fw.WhisperModel(str(ct2_dir), device="cpu", compute_type="float32")
    texts = []
    for audio in clips[0]:
        # faster-whisper >= 1.0 pads a short clip's *features* with zeros, where OpenAI (and dwjax) pad the audio
        # with 30 s of silence; handing it the padded clip gives both the same input, so the model is compared
        segs, _ = model.transcribe(pad_or_trim(audio), beam_size=1, temperature=0.0, without_timestamps=True,
                                   condition_on_previous_text=False, vad_filter=False)
        texts.append(" ".join(s.text.strip() for s in segs).strip())
    same = sum(a == b for a, b in zip(texts, ref.texts)) / len(texts)
    w_fw, w_dw = wer(clips[1], texts), wer(clips[1], ref.texts)
    print(f"faster-whisper: {same:.0%} transcripts equal; WER {w_fw:.4f} vs dwjax {w_dw:.4f}")
    assert same >= 0.9
    assert abs(w_fw - w_dw) <= 0.005     # 0.5 points


def test_faster_whisper_float16_export(teacher, ref, clips, tmp_path):
    fw = _reference("faster_whisper", "faster-whisper")
    from dwjax.audio import pad_or_trim
    out = ex.export_model(teacher, "ctranslate2", tmp_path / "ct2", dtype="float16")
    model = fw.WhisperModel(str(out), device="cpu", compute_type="float32")
    segs, _ = model.transcribe(pad_or_trim(clips[0][1]), beam_size=1, temperature=0.0, without_timestamps=True)
    from dwjax.text.wer import wer
    assert wer(ref.texts[1], " ".join(s.text for s in segs)) < 0.2


def test_ct2_files(ct2_dir, teacher):
    import json
    from dwjax.weights.ctranslate2 import read_model_bin
    spec, t = read_model_bin(ct2_dir / "model.bin")
    assert spec == "WhisperSpec"
    builtin_dir = load_model(TEACHER)  # the original file's scalars
    from dwjax.weights.loading import _builtin
    _, orig = read_model_bin(_builtin(TEACHER)[1][0])
    for k, v in orig.items():
        if v.ndim == 0:
            assert t[k].dtype == v.dtype and t[k].shape == () and t[k] == v, k
    assert set(t) == set(orig)      # same variables, projection alias included
    c = json.loads((ct2_dir / "config.json").read_text())
    assert c.pop("lang_ids") == sorted(teacher.tokenizer.languages.values())   # the vocabulary's <|xx|> ids
    assert c == {k: builtin_dir.generation[k] for k in ("alignment_heads", "suppress_ids", "suppress_ids_begin")}


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ["hf", "ctranslate2", "openai"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(teacher, fmt, dtype, tmp_path):
    if fmt == "openai":
        _reference("torch", "torch")      # reading model.pt back needs it
    out = ex.export_model(teacher, fmt, tmp_path / fmt, dtype=dtype)
    back = load_model(out / "model.pt" if fmt == "openai" else out)
    assert back.cfg == teacher.cfg
    _assert_params(teacher.params, back.params, cast=np.float16 if dtype == "float16" else None)
    assert back.tokenizer.vocab_size == teacher.tokenizer.vocab_size
    if fmt != "openai":
        assert back.generation["suppress_ids"] == teacher.generation["suppress_ids"]
        assert back.generation["suppress_ids_begin"] == teacher.generation["suppress_ids_begin"]


def test_openai_loads_in_whisper(teacher, ref, tmp_path, monkeypatch):
    import importlib.util
    import types
    torch = _reference("torch", "torch")
    if importlib.util.find_spec("whisper") is None:
        pytest.fail("openai-whisper is the independent reference of this test and is not installed; "
                    "pip install --no-deps openai-whisper", pytrace=False)
    if importlib.util.find_spec("numba") is None:
        # .ci/run installs openai-whisper --no-deps (tests/test_text.py reads its files), so numba is absent; whisper
        # imports it only to jit the word-timestamp DTW in whisper/timing.py, which the model never calls: a
        # pass-through `numba.jit` lets whisper.model (pure torch) import
        stub = types.ModuleType("numba")
        stub.jit = lambda *a, **k: (lambda f: f)
        monkeypatch.setitem(sys.modules, "numba", stub)
    whisper_model = _reference("whisper.model", "openai-whisper")
    ModelDimensions, Whisper = whisper_model.ModelDimensions, whisper_model.Whisper
    out = ex.export_model(teacher, "openai", tmp_path / "oa")
    ckpt = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    m = Whisper(ModelDimensions(**ckpt["dims"]))
    m.load_state_dict(ckpt["model_state_dict"])        # strict
    tokens = ref.forced_tokens(n=2)
    with torch.no_grad():
        logits = m(torch.from_numpy(ref.mel[:2].copy()), torch.from_numpy(tokens.astype(np.int64))).numpy()
    diff = float(np.max(np.abs(logits - ref.logits(tokens))))
    print(f"tiny.en -> openai: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


# --------------------------------------------------------------------------------------------- bad input
def _cli(*args) -> int:
    from dwjax.cli import main
    return main(["export", *map(str, args)])


def test_cli_writes(tmp_path, capsys):
    assert _cli("--model", TEACHER, "--format", "ctranslate2", "--output", tmp_path / "o", "--dtype", "float16") == 0
    assert "wrote ctranslate2" in capsys.readouterr().out
    assert (tmp_path / "o" / "model.bin").exists()
    # --overwrite replaces a non-empty directory whole
    (tmp_path / "o" / "stale.txt").write_text("x")
    assert _cli("--model", TEACHER, "--format", "openai", "--output", tmp_path / "o", "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["checksums.sha256", "model.pt", "vocabulary.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.parametrize("case", ["nonempty", "format", "nomodel", "missing", "file", "decoder_only", "dtype"])
def test_cli_bad_input(tmp_path, capsys, case):
    out = tmp_path / "out"
    args = ["--model", TEACHER, "--format", "hf", "--output", out]
    if case == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "format":
        args[3] = "onnx"
    elif case == "nomodel":
        (tmp_path / "empty").mkdir()
        args[1] = tmp_path / "empty"
    elif case == "missing":
        args[1] = tmp_path / "nothing-here"
    elif case == "file":
        out.write_text("a file")
    elif case == "decoder_only":
        args[3] = "ctranslate2"
        args.append("--decoder-only")
    elif case == "dtype":
        args += ["--dtype", "int8"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _cli(*args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dwjax export: error: ") and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before        # nothing written, no temp dirs
    if case == "nonempty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_export_leaves_nothing(teacher, tmp_path, monkeypatch):
    def boom(model, directory, *a, **k):
        (directory / "model.bin").write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(ex, "write_ct2", boom)
    with pytest.raises(OSError):
        ex.export_model(teacher, "ctranslate2", tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_export_without_torch_is_clear(teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch -> ImportError
    with pytest.raises(UserError, match="needs PyTorch"):
        ex.export_model(teacher, "openai", tmp_path / "o")
    assert list(tmp_path.iterdir()) == []
    ex.export_model(teacher, "hf", tmp_path / "h")   # hf needs no torch
    assert (tmp_path / "h" / "model.safetensors").exists()


def test_alignment_heads_for_students(teacher):
    s = _student(teacher)
    s_meta = dataclasses.replace(s, metadata={"decoder_layer_ids": [0, teacher.cfg.decoder_layers - 1]})
    t_heads = [list(h) for h in teacher.generation["alignment_heads"]]
    last = teacher.cfg.decoder_layers - 1
    assert ex.alignment_heads(teacher) == t_heads
    assert ex.alignment_heads(s_meta) == [[0 if l == 0 else 1, h] for l, h in t_heads if l in (0, last)]
    assert ex.alignment_heads(s) == [[1, h] for h in range(s.cfg.decoder_heads)]   # last half of the layers


# --------------------------------------------------------------------------------------------- slow: base
@pytest.mark.slow
def test_base_and_student_to_hf_and_ct2(clips, tmp_path):
    base = _load("builtin:whisper-base")
    for name, model in (("base", base), ("base student", _student(base))):
        r = _Dwjax(model, clips[0])
        # base is deeper and wider than tiny: fp32 rounding reaches ~1.2e-4 in dwjax's logits (vs float64) and
        # ~1.7e-4 between dwjax and transformers (both fp32), measured on these 24 clips
        _check_hf_matches(ex.export_model(model, "hf", tmp_path / name / "hf"), r, f"{name} -> hf", tol=3e-4,
                          tol64=2e-4)
        back = load_model(ex.export_model(model, "ctranslate2", tmp_path / name / "ct2"))
        _assert_params(model.params, back.params)
