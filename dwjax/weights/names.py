"""The one table that maps dwjax parameters to the names and layouts of other formats.

Each row: (dwjax path, kind, transformers name, OpenAI name, CTranslate2 name). `{i}` is the layer index; a
dwjax path under `*/layers/...` is stacked on a leading layer axis. A CTranslate2 name may carry `#k/n`: the k-th
of n equal row blocks of a fused matrix (CTranslate2 fuses q,k,v of self-attention and k,v of cross-attention).

Kinds say how the array is laid out (torch-style formats store linear weights as (out, in)):
  linear   dwjax (in, out)          <-> (out, in)
  qkv      dwjax (d, heads, hd)     <-> (heads*hd, d);  bias (heads, hd) <-> (heads*hd,)
  attn_out dwjax (heads, hd, d)     <-> (d, heads*hd)
  conv     dwjax (k, in, out)       <-> (out, in, k)
  same     identical layout
"""
from __future__ import annotations

import re

import numpy as np

from dwjax.models.configs import WhisperConfig

_ATTN = [  # (dwjax sub-path, kind, hf, openai, ct2 self, ct2 cross)
    ("query/kernel", "qkv", "q_proj.weight", "query.weight", "linear_0/weight#0/3", "linear_0/weight"),
    ("query/bias", "qkv_bias", "q_proj.bias", "query.bias", "linear_0/bias#0/3", "linear_0/bias"),
    ("key/kernel", "qkv", "k_proj.weight", "key.weight", "linear_0/weight#1/3", "linear_1/weight#0/2"),
    ("value/kernel", "qkv", "v_proj.weight", "value.weight", "linear_0/weight#2/3", "linear_1/weight#1/2"),
    ("value/bias", "qkv_bias", "v_proj.bias", "value.bias", "linear_0/bias#2/3", "linear_1/bias#1/2"),
    ("out/kernel", "attn_out", "out_proj.weight", "out.weight", "linear_1/weight", "linear_2/weight"),
    ("out/bias", "same", "out_proj.bias", "out.bias", "linear_1/bias", "linear_2/bias"),
]
# key has no bias in Whisper; the fused CTranslate2 bias has zeros there
ZERO_BIAS_CT2 = {"self": ("linear_0/bias#1/3",), "cross": ("linear_1/bias#0/2",)}

_NORM = [("scale", "weight", "weight", "gamma"), ("bias", "bias", "bias", "beta")]


def _rows():
    rows = []
    for side, hf_side, oa_side in (("encoder", "model.encoder", "encoder"), ("decoder", "model.decoder", "decoder")):
        L = f"{side}/layers"
        hl, ol, cl = f"{hf_side}.layers.{{i}}", f"{oa_side}.blocks.{{i}}", f"{side}/layer_{{i}}"
        attns = [("self_attn", "self_attn", "attn", "self_attention", 4)]
        if side == "decoder":
            attns.append(("cross_attn", "encoder_attn", "cross_attn", "attention", 5))
        for name, hf_name, oa_name, ct_name, col in attns:
            for sub, kind, hf, oa, ct_self, ct_cross in _ATTN:
                ct = ct_self if col == 4 else ct_cross
                rows.append((f"{L}/{name}/{sub}", kind, f"{hl}.{hf_name}.{hf}", f"{ol}.{oa_name}.{oa}",
                             f"{cl}/{ct_name}/{ct}"))
            for sub, hf, oa, ct in _NORM:
                rows.append((f"{L}/{name}_norm/{sub}", "same", f"{hl}.{hf_name}_layer_norm.{hf}",
                             f"{ol}.{oa_name}_ln.{oa}", f"{cl}/{ct_name}/layer_norm/{ct}"))
        for fc, hf, oa, ct in (("fc1", "fc1", "mlp.0", "ffn/linear_0"), ("fc2", "fc2", "mlp.2", "ffn/linear_1")):
            rows.append((f"{L}/mlp/{fc}/kernel", "linear", f"{hl}.{hf}.weight", f"{ol}.{oa}.weight", f"{cl}/{ct}/weight"))
            rows.append((f"{L}/mlp/{fc}/bias", "same", f"{hl}.{hf}.bias", f"{ol}.{oa}.bias", f"{cl}/{ct}/bias"))
        for sub, hf, oa, ct in _NORM:
            rows.append((f"{L}/mlp_norm/{sub}", "same", f"{hl}.final_layer_norm.{hf}", f"{ol}.mlp_ln.{oa}",
                         f"{cl}/ffn/layer_norm/{ct}"))
        final_oa = "encoder.ln_post" if side == "encoder" else "decoder.ln"
        for sub, hf, oa, ct in _NORM:
            rows.append((f"{side}/final_norm/{sub}", "same", f"{hf_side}.layer_norm.{hf}", f"{final_oa}.{oa}",
                         f"{side}/layer_norm/{ct}"))
    for conv in ("conv1", "conv2"):
        rows.append((f"encoder/{conv}/kernel", "conv", f"model.encoder.{conv}.weight", f"encoder.{conv}.weight",
                     f"encoder/{conv}/weight"))
        rows.append((f"encoder/{conv}/bias", "same", f"model.encoder.{conv}.bias", f"encoder.{conv}.bias",
                     f"encoder/{conv}/bias"))
    rows += [
        ("encoder/embed_positions", "same", "model.encoder.embed_positions.weight", "encoder.positional_embedding",
         "encoder/position_encodings/encodings"),
        ("decoder/embed_positions", "same", "model.decoder.embed_positions.weight", "decoder.positional_embedding",
         "decoder/position_encodings/encodings"),
        ("decoder/embed_tokens/embedding", "same", "model.decoder.embed_tokens.weight",
         "decoder.token_embedding.weight", "decoder/embeddings/weight"),
    ]
    return rows


ROWS = _rows()
FORMATS = {"hf": 2, "openai": 3, "ctranslate2": 4}


def _to_dwjax(arr: np.ndarray, kind: str, cfg: WhisperConfig, side: str) -> np.ndarray:
    heads = cfg.encoder_heads if side == "encoder" else cfg.decoder_heads
    if kind == "linear":
        return arr.T
    if kind == "qkv":
        return arr.T.reshape(arr.shape[1], heads, -1)
    if kind == "qkv_bias":
        return arr.reshape(heads, -1)
    if kind == "attn_out":
        return arr.T.reshape(heads, -1, arr.shape[0])
    if kind == "conv":
        return arr.transpose(2, 1, 0)
    return arr


def _from_dwjax(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return arr.T
    if kind == "qkv":
        return arr.reshape(arr.shape[0], -1).T
    if kind == "qkv_bias":
        return arr.reshape(-1)
    if kind == "attn_out":
        return arr.reshape(-1, arr.shape[-1]).T
    if kind == "conv":
        return arr.transpose(2, 1, 0)
    return arr


def _split_fused(name: str):
    m = re.match(r"(.*)#(\d+)/(\d+)$", name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else (name, None, None)


def _layers(cfg: WhisperConfig, path: str) -> int:
    return cfg.encoder_layers if path.startswith("encoder") else cfg.decoder_layers


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def _external_array(tensors: dict, name: str, fmt: str) -> np.ndarray:
    base, k, n = _split_fused(name)
    if base not in tensors:
        raise KeyError(name)
    arr = np.asarray(tensors[base])
    if k is not None:
        arr = np.split(arr, n, axis=0)[k]
    return arr


def to_dwjax(tensors: dict, cfg: WhisperConfig, fmt: str, dtype=np.float32) -> dict:
    """External name -> array dict (any of FORMATS) to the nested dwjax parameter tree (layers stacked)."""
    col, params, missing = FORMATS[fmt], {}, []
    for row in ROWS:
        path, kind, ext = row[0], row[1], row[col]
        side = path.split("/")[0]
        try:
            if "/layers/" in path:
                arrs = [_to_dwjax(_external_array(tensors, ext.format(i=i), fmt), kind, cfg, side)
                        for i in range(_layers(cfg, path))]
                value = np.stack(arrs)
            else:
                value = _to_dwjax(_external_array(tensors, ext.format(i=0), fmt), kind, cfg, side)
        except KeyError as e:
            missing.append(str(e).strip("'"))
            continue
        _set(params, path, np.ascontiguousarray(value, dtype=dtype))
    if missing:
        raise KeyError(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
    return params


def from_dwjax(params: dict, cfg: WhisperConfig, fmt: str, dtype=np.float32) -> dict:
    """The nested dwjax tree to an external name -> array dict; fused CTranslate2 matrices are concatenated."""
    col, out, fused = FORMATS[fmt], {}, {}
    for row in ROWS:
        path, kind, ext = row[0], row[1], row[col]
        value = np.asarray(_get(params, path), dtype=np.float32)
        items = [(ext.format(i=i), value[i]) for i in range(value.shape[0])] if "/layers/" in path \
            else [(ext.format(i=0), value)]
        for name, arr in items:
            base, k, n = _split_fused(name)
            arr = _from_dwjax(arr, kind).astype(dtype)
            if k is None:
                out[base] = np.ascontiguousarray(arr)
            else:
                fused.setdefault(base, [None] * n)[k] = arr
    if fmt == "ctranslate2":  # the key bias blocks, zeros in Whisper
        for which, names in ZERO_BIAS_CT2.items():
            for i in range(cfg.decoder_layers if which == "cross" else max(cfg.encoder_layers, cfg.decoder_layers)):
                for side in (("encoder", "decoder") if which == "self" else ("decoder",)):
                    if i >= (cfg.encoder_layers if side == "encoder" else cfg.decoder_layers):
                        continue
                    prefix = f"{side}/layer_{i}/{'self_attention' if which == 'self' else 'attention'}/"
                    for nm in names:
                        base, k, n = _split_fused(prefix + nm)
                        parts = fused[base]
                        ref = next(p for p in parts if p is not None)
                        parts[k] = np.zeros_like(ref)
    for base, parts in fused.items():
        out[base] = np.ascontiguousarray(np.concatenate(parts, axis=0))
    if fmt == "hf":
        out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]
    return out
