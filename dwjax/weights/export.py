"""Write a model in the formats other tools load: transformers, CTranslate2 (faster-whisper) and OpenAI `.pt`.

    export_model(model: LoadedModel, fmt, output, dtype="float32", overwrite=False, decoder_only=False) -> Path
    resolve_model(name_or_path) -> LoadedModel      # what `dwjax export --model` accepts

Files written into the output directory:
  hf           model.safetensors (numpy, no torch needed; `proj_out.weight` left out: transformers ties it to
               `model.decoder.embed_tokens.weight`, as its own `save_pretrained` does), config.json,
               generation_config.json, tokenizer files (vocab.json, merges.txt, added_tokens.json,
               special_tokens_map.json, tokenizer_config.json, tokenizer.json), preprocessor_config.json.
               `decoder_only=True`: a `WhisperForCausalLM` (only the `model.decoder.*` weights), the layout
               transformers takes as `assistant_model` for speculative decoding: it reuses the main model's
               encoder outputs, so the assistant's encoder must be the main model's (true for dwjax students,
               which keep their teacher's encoder).
  ctranslate2  model.bin (WhisperSpec revision 3, float32 or float16), config.json (alignment_heads, lang_ids,
               suppress_ids, suppress_ids_begin), vocabulary.txt, tokenizer.json (faster-whisper reads it; without
               it faster-whisper would download one).
  openai       model.pt ({"dims", "model_state_dict"}; needs torch) and vocabulary.txt beside it.
  every format checksums.sha256: the sha256 of the weight file (model.safetensors, model.bin or model.pt), in
               `sha256sum` format; `load_model` verifies it (`dwjax/weights/integrity.py`).

Alignment heads (cross-attention heads that follow the audio, used for word timestamps): the model's own heads
when they all exist in its decoder. A student with fewer decoder layers than its teacher carries the teacher's
heads; when its metadata names the teacher layer each decoder layer came from
(`metadata["decoder_layer_ids"]`, e.g. [0, 3]) the teacher heads of those layers are kept, renumbered;
otherwise every head of the last half of the decoder layers is used (OpenAI's default when a model has none).

Everything is written into a temporary directory beside the target and renamed into place at the end, so a failed
export leaves nothing behind and an existing output is replaced only with `overwrite`. The directory and its files
get the user's umask (0o777 / 0o666 & ~umask). An output that cannot be written (a read-only file system, no
permission, /sys/...) is a one-line UserError before any weights are converted (`check_writable`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from dwjax.decoding.rules import DecodeSpec
from dwjax.errors import UserError, WeightsError
from dwjax.models.configs import WhisperConfig
from dwjax.weights import ctranslate2, integrity, names
from dwjax.weights.loading import LoadedModel, load_model
from dwjax.weights.tokenizer_files import bpe_merges, write_hf_files, write_vocabulary

FORMATS = ("hf", "ctranslate2", "openai")
WEIGHT_FILE = {"hf": "model.safetensors", "ctranslate2": "model.bin", "openai": "model.pt"}
DTYPES = {"float32": np.float32, "float16": np.float16}
CT2_REVISION = 3            # WhisperSpec's revision in CTranslate2 4.x (and in OpenAI's converted models)
CT2_GELU = 3                # CTranslate2's Activation enum: RELU 0, GELU_TANH 1, SWISH 2, GELU 3
HF_MAX_LENGTH = 448
MAX_INITIAL_TIMESTAMP_INDEX = 50

# Model resolvers tried in order before `load_model`; each returns a LoadedModel or None when the name is not
# its kind (training checkpoints will register one here).
RESOLVERS: list[Callable[[str], Optional[LoadedModel]]] = []


def resolve_model(name_or_path: str) -> LoadedModel:
    """Load what `dwjax export --model` names: a registered resolver's kind, else anything `load_model` accepts."""
    for resolver in RESOLVERS:
        model = resolver(str(name_or_path))
        if model is not None:
            return model
    return load_model(name_or_path)


# ------------------------------------------------------------------------------------------------ shared facts
def _suppress_lists(model: LoadedModel) -> tuple[list[int], list[int]]:
    """(suppress every step, suppress at the first step) as the model decodes them (OpenAI's rule if none given)."""
    spec = DecodeSpec.for_model(model.tokenizer, model.generation or {}, model.cfg.vocab_size)
    return list(spec.suppress), list(spec.begin_suppress)


def alignment_heads(model: LoadedModel) -> list[list[int]]:
    """[layer, head] pairs valid for the model's decoder (see the module docstring for students)."""
    n_layers, n_heads = model.cfg.decoder_layers, model.cfg.decoder_heads
    heads = [[int(l), int(h)] for l, h in (model.generation or {}).get("alignment_heads") or []]
    if heads and all(0 <= l < n_layers and 0 <= h < n_heads for l, h in heads):
        return heads
    origin = (model.metadata or {}).get("decoder_layer_ids")          # written by init-student
    if heads and origin and len(origin) == n_layers:
        where = {int(t): s for s, t in enumerate(origin)}
        kept = [[where[l], h] for l, h in heads if l in where and h < n_heads]
        if kept:
            return kept
    return [[l, h] for l in range(n_layers // 2, n_layers) for h in range(n_heads)]


def _generation_for_ct2(model: LoadedModel) -> dict:
    suppress, begin = _suppress_lists(model)
    return {"alignment_heads": alignment_heads(model), "lang_ids": sorted(model.tokenizer.languages.values()),
            "suppress_ids": suppress, "suppress_ids_begin": begin}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_json(tokenizer, directory) -> Path:
    """A `tokenizers` tokenizer.json (byte-level BPE, the special and timestamp tokens added) for faster-whisper
    and transformers' fast tokenizer."""
    eot = tokenizer.eot
    vocab = {tokenizer.id_to_token(i): i for i in range(eot)}
    bpe = models.BPE(vocab=vocab, merges=bpe_merges(tokenizer))
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    added = [tokenizer.id_to_token(i) for i in range(eot, tokenizer.vocab_size)]
    ts = tokenizer.timestamp_begin
    tk.add_tokens([AddedToken(t, special=eot + k < ts, normalized=False) for k, t in enumerate(added)])
    for k, t in enumerate(added):
        if tk.token_to_id(t) != eot + k:
            raise WeightsError(f"tokenizer.json: token {t!r} got id {tk.token_to_id(t)}, not {eot + k}")
    path = Path(directory) / "tokenizer.json"
    tk.save(str(path))
    return path


# ------------------------------------------------------------------------------------------------ transformers
def hf_config(model: LoadedModel, dtype: str = "float32", decoder_only: bool = False) -> dict:
    cfg, tok = model.cfg, model.tokenizer
    return {
        "architectures": ["WhisperForCausalLM" if decoder_only else "WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": cfg.vocab_size,
        "num_mel_bins": cfg.n_mels,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.encoder_layers,
        "encoder_attention_heads": cfg.encoder_heads,
        "encoder_ffn_dim": cfg.ffn_dim,
        "decoder_layers": cfg.decoder_layers,
        "decoder_attention_heads": cfg.decoder_heads,
        "decoder_ffn_dim": cfg.ffn_dim,
        "num_hidden_layers": cfg.encoder_layers,
        "max_source_positions": cfg.n_audio_ctx,
        "max_target_positions": cfg.n_text_ctx,
        "activation_function": "gelu",
        "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        "init_std": 0.02,
        "scale_embedding": False,
        "use_cache": True,
        "is_encoder_decoder": not decoder_only,
        "tie_word_embeddings": True,
        "bos_token_id": tok.eot,
        "eos_token_id": tok.eot,
        "pad_token_id": tok.eot,
        "decoder_start_token_id": tok.sot,
        "apply_spec_augment": False,
        "median_filter_width": 7,
        "dtype": dtype,
    }


def hf_generation_config(model: LoadedModel) -> dict:
    tok = model.tokenizer
    suppress, begin = _suppress_lists(model)
    g = {
        "bos_token_id": tok.eot,
        "eos_token_id": tok.eot,
        "pad_token_id": tok.eot,
        "decoder_start_token_id": tok.sot,
        "is_multilingual": tok.is_multilingual,
        "no_timestamps_token_id": tok.no_timestamps,
        "prev_sot_token_id": tok.sot_prev,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin,
        "max_initial_timestamp_index": MAX_INITIAL_TIMESTAMP_INDEX,
        "max_length": min(HF_MAX_LENGTH, model.cfg.n_text_ctx),
        "alignment_heads": alignment_heads(model),
        "return_timestamps": False,
    }
    if tok.is_multilingual:
        g["lang_to_id"] = {f"<|{code}|>": i for code, i in tok.languages.items()}
        g["task_to_id"] = {"transcribe": tok.transcribe, "translate": tok.translate}
    return g


def hf_preprocessor_config(cfg: WhisperConfig) -> dict:
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": cfg.n_mels,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "chunk_length": 30,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


def write_hf(model: LoadedModel, directory: Path, dtype: str = "float32", decoder_only: bool = False) -> None:
    tensors = names.from_dwjax(model.params, model.cfg, "hf", DTYPES[dtype])
    tensors.pop("proj_out.weight", None)   # tied to the token embedding (transformers re-ties it on load)
    if decoder_only:
        tensors = {k: v for k, v in tensors.items() if k.startswith("model.decoder.")}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _write_json(directory / "config.json", hf_config(model, dtype, decoder_only))
    _write_json(directory / "generation_config.json", hf_generation_config(model))
    _write_json(directory / "preprocessor_config.json", hf_preprocessor_config(model.cfg))
    write_hf_files(model.tokenizer, directory)
    write_tokenizer_json(model.tokenizer, directory)


# ------------------------------------------------------------------------------------------------ CTranslate2
def ct2_variables(model: LoadedModel, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The variables of a WhisperSpec model.bin, scalars included, sorted by name as CTranslate2 writes them."""
    cfg = model.cfg
    out = names.from_dwjax(model.params, cfg, "ctranslate2", DTYPES[dtype])
    scalars = {
        "encoder/num_heads": np.int16(cfg.encoder_heads),
        "decoder/num_heads": np.int16(cfg.decoder_heads),
        "decoder/activation": np.int8(CT2_GELU),
        "decoder/alibi": np.int8(0),
        "decoder/alignment_heads": np.int16(1),
        "decoder/alignment_layer": np.int16(-1),
        "decoder/pre_norm": np.int8(1),
        "decoder/scale_embeddings": np.int8(0),
        "decoder/start_from_zero_embedding": np.int8(0),
    }
    out.update({k: np.asarray(v) for k, v in scalars.items()})
    return dict(sorted(out.items()))


CT2_ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}   # the tied output projection


def write_ct2(model: LoadedModel, directory: Path, dtype: str = "float32") -> None:
    ctranslate2.write_model_bin(directory / "model.bin", "WhisperSpec", ct2_variables(model, dtype),
                                revision=CT2_REVISION, aliases=CT2_ALIASES)
    _write_json(directory / "config.json", _generation_for_ct2(model))
    write_vocabulary(model.tokenizer, directory)
    write_tokenizer_json(model.tokenizer, directory)


# ------------------------------------------------------------------------------------------------ OpenAI
def openai_dims(cfg: WhisperConfig) -> dict:
    return {"n_mels": cfg.n_mels, "n_vocab": cfg.vocab_size, "n_audio_ctx": cfg.n_audio_ctx,
            "n_audio_state": cfg.d_model, "n_audio_head": cfg.encoder_heads, "n_audio_layer": cfg.encoder_layers,
            "n_text_ctx": cfg.n_text_ctx, "n_text_state": cfg.d_model, "n_text_head": cfg.decoder_heads,
            "n_text_layer": cfg.decoder_layers}


def write_openai(model: LoadedModel, directory: Path, dtype: str = "float32") -> None:
    try:
        import torch
    except ImportError:
        raise WeightsError("the openai format (.pt) needs PyTorch: pip install torch") from None
    if model.cfg.ffn_dim != 4 * model.cfg.d_model:
        raise WeightsError(f"the openai format assumes ffn_dim = 4 x d_model; this model has {model.cfg.ffn_dim}")
    tensors = names.from_dwjax(model.params, model.cfg, "openai", DTYPES[dtype])
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    torch.save({"dims": openai_dims(model.cfg), "model_state_dict": state}, directory / "model.pt")
    write_vocabulary(model.tokenizer, directory)


# ------------------------------------------------------------------------------------------------ the export
def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"--output {output} is not empty; pass --overwrite to replace it")


def check_writable(output) -> None:
    """Raise UserError (one line) unless a directory can be created beside `output` (in its nearest existing
    ancestor): probes with a temporary directory that is removed at once. Run before loading a model."""
    output = Path(os.path.expanduser(str(output))).absolute()
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output {output}: {parent} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=f".{output.name}.probe-", dir=parent)
    except OSError as e:
        raise UserError(f"--output {output}: cannot write in {parent}: {e.strerror or e}") from None
    os.rmdir(probe)


def needs(fmt: str) -> None:
    """Raise WeightsError (one line) when a package `fmt` needs is missing: tokenizers (hf, ctranslate2; a
    dependency of dwjax) and torch (openai, optional)."""
    if fmt == "openai" and importlib.util.find_spec("torch") is None:
        raise WeightsError("the openai format (.pt) needs PyTorch: pip install torch")
    if fmt in ("hf", "ctranslate2") and importlib.util.find_spec("tokenizers") is None:
        raise WeightsError(f"the {fmt} format writes tokenizer.json, which needs the tokenizers package: "
                           "pip install tokenizers")


def export_model(model: LoadedModel, fmt: str, output, dtype: str = "float32", overwrite: bool = False,
                 decoder_only: bool = False) -> Path:
    """Write `model` as `fmt` into the directory `output` (all or nothing); returns the directory."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose float32 or float16")
    if decoder_only and fmt != "hf":
        raise UserError("--decoder-only is only for --format hf (a transformers assistant model)")
    output = Path(os.path.expanduser(str(output))).absolute()
    _check_output(output, overwrite)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    except OSError as e:
        raise UserError(f"--output {output}: cannot write in {output.parent}: {e.strerror or e}") from None
    try:
        if fmt == "hf":
            write_hf(model, tmp, dtype, decoder_only)
        elif fmt == "ctranslate2":
            write_ct2(model, tmp, dtype)
        else:
            write_openai(model, tmp, dtype)
        integrity.write_record(tmp, [WEIGHT_FILE[fmt]])
        integrity.apply_umask(tmp)          # mkdtemp made it 0700, safetensors' save_file 0600
        _check_output(output, overwrite)   # again: something may have appeared meanwhile
        old = None
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, old)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
