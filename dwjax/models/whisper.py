"""Whisper encoder-decoder in Flax Linen.

One parameter layout: the layers of the encoder and of the decoder are stacked on a leading `layers` axis and run
with `nn.scan`; `scan_layers=False` unrolls that same scan fully (faster to compile on small models, the same
numbers), so weights, checkpoints and exports never depend on the switch.

Decoding uses an explicit KV cache, a pytree passed in and returned (no mutable Flax collections):
    cache = {"k", "v": one (batch, heads, max_len, head_dim) array per decoder layer,
             "cross_k", "cross_v": one (batch, heads, n_audio_ctx, head_dim) array per layer, or None before the
                                   first call,
             "index": (batch,) int32 — how many positions of each row are filled}
Rows may stand at different positions (speculative decoding accepts per row); rolling back is lowering `index`.

How the model computes (attention kernel, query chunking, per-example encoding) is its `kernels` field
(`dwjax/models/kernels.py`); "auto" there is decided once per module for `jax.default_backend()` (`machine_kernels`).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dwjax.models.configs import WhisperConfig
from dwjax.models.kernels import Kernels

Dtype = Any


def _init(init_fn, names):
    return nn.with_logical_partitioning(init_fn, names)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed encoder position table (used to initialise it)."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (eps 1e-5 as in Whisper), output in the compute dtype."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", _init(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
        bias = self.param("bias", _init(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head attention; `key` has no bias, as in Whisper. `kernels`: resolved (`machine_kernels`)."""
    heads: int
    head_dim: int
    d_model: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()

    def setup(self):
        def proj(bias=True):
            return nn.DenseGeneral((self.heads, self.head_dim), use_bias=bias, dtype=self.dtype,
                                   param_dtype=self.param_dtype,
                                   kernel_init=_init(nn.initializers.normal(0.02), ("embed", "heads", "head_dim")),
                                   bias_init=_init(nn.initializers.zeros, ("heads", "head_dim")))
        self.query, self.key, self.value = proj(), proj(bias=False), proj()
        self.out = nn.DenseGeneral(self.d_model, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                                   kernel_init=_init(nn.initializers.normal(0.02), ("heads", "head_dim", "embed")),
                                   bias_init=_init(nn.initializers.zeros, ("embed",)))

    def kv(self, source):
        """Keys and values of `source` (b, s, d) in heads-major layout (b, h, s, hd), the layout of the cache."""
        return self.key(source).transpose(0, 2, 1, 3), self.value(source).transpose(0, 2, 1, 3)

    def _scaled_query(self, x):
        return self.query(x) * jnp.asarray(self.head_dim ** -0.5, self.dtype)

    def __call__(self, x, k, v, mask):
        """x: (b, t, d) queries; k, v: (b, h, s, hd); mask: bool broadcastable to (b, 1, t, s) or None."""
        return self.out(attend(self._scaled_query(x), k.astype(self.dtype), v.astype(self.dtype), mask, self.dtype,
                               self.kernels))

    def cached(self, x, k_cache, v_cache, cache_mask, k_new, v_new, new_mask):
        """Attention over a KV cache plus the new tokens' own keys/values.

        k_cache/v_cache (b, h, S, hd) with cache_mask (b, 1, 1, S) marking the positions written before this
        call; k_new/v_new (b, h, t, hd) with new_mask (1, 1, t, t) causal. One softmax over both parts, so the
        result equals attention over the written cache. The caller may already have written k_new/v_new into
        the cache (`DecoderLayer` does, so the write is in place): cache_mask hides those positions."""
        q = self._scaled_query(x).transpose(0, 2, 1, 3)
        neg = jnp.finfo(jnp.float32).min
        s_cache = jnp.einsum("bhtd,bhsd->bhts", q, k_cache.astype(self.dtype)).astype(jnp.float32)
        s_new = jnp.einsum("bhtd,bhsd->bhts", q, k_new.astype(self.dtype)).astype(jnp.float32)
        probs = jax.nn.softmax(jnp.concatenate([jnp.where(cache_mask, s_cache, neg),
                                                jnp.where(new_mask, s_new, neg)], axis=-1), axis=-1)
        probs = probs.astype(self.dtype)
        n = k_cache.shape[2]
        out = (jnp.einsum("bhts,bhsd->bhtd", probs[..., :n], v_cache.astype(self.dtype))
               + jnp.einsum("bhts,bhsd->bhtd", probs[..., n:], v_new.astype(self.dtype)))
        return self.out(out.transpose(0, 2, 1, 3))


def machine_kernels(kernels: Kernels, dtype) -> Kernels:
    """`kernels` with "auto" decided for this process's JAX backend and the compute dtype (`Kernels.resolve`)."""
    return kernels.resolve(jax.default_backend(), jnp.dtype(dtype).name)


def attend(q, k, v, mask, dtype, kernels: Kernels = Kernels()):
    """softmax(q k^T) v. Keys and values are heads-major (b, h, s, hd), so both products are plain batched
    matmuls (2x faster than the sequence-major einsums on CPU) and a cache is never transposed; long unmasked
    queries (the encoder) go block by block (`kernels.query_chunk`) so each block's scores stay in cache.
    Unmasked attention over several queries uses `jax.nn.dot_product_attention` when `kernels.attention` is
    "cudnn" or "xla" (its implementation); everything else the einsums."""
    b, t, h, d = q.shape
    impl = kernels.attention if mask is None and t > 1 and kernels.attention in ("cudnn", "xla") else None
    if impl:
        # a fused (flash) attention kernel: the (t, s) scores never reach memory. q is already scaled.
        return jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=1.0,
                                            implementation=impl)
    qt = q.transpose(0, 2, 1, 3)

    def block(qc, m):
        scores = jnp.einsum("bhtd,bhsd->bhts", qc, k).astype(jnp.float32)
        if m is not None:
            scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(scores, axis=-1).astype(dtype), v)

    chunk = kernels.query_chunk
    if mask is None and chunk and t > chunk and t % chunk == 0:
        n = t // chunk
        blocks = qt.reshape(b, h, n, chunk, d).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda qc: block(qc, None), blocks)            # (n, b, h, chunk, d)
        out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, t, d)
    else:
        out = block(qt, mask)
    return out.transpose(0, 2, 1, 3)


class MLP(nn.Module):
    ffn_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.Dense(self.ffn_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                     kernel_init=_init(nn.initializers.normal(0.02), ("embed", "mlp")),
                     bias_init=_init(nn.initializers.zeros, ("mlp",)))(x)
        h = nn.gelu(h, approximate=False)
        h = nn.with_logical_constraint(h, ("batch", None, "mlp"))
        return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
                        kernel_init=_init(nn.initializers.normal(0.02), ("mlp", "embed")),
                        bias_init=_init(nn.initializers.zeros, ("embed",)))(h)


class EncoderLayer(nn.Module):
    cfg: WhisperConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x, _):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = Attention(c.encoder_heads, c.d_model // c.encoder_heads, c.d_model, name="self_attn",
                         kernels=self.kernels, **kw)
        h = LayerNorm(name="self_attn_norm", **kw)(x)
        k, v = attn.kv(h)
        x = x + attn(h, k, v, None)
        x = x + MLP(c.ffn_dim, name="mlp", **kw)(LayerNorm(name="mlp_norm", **kw)(x))
        x = nn.with_logical_constraint(x, ("batch", "enc_len", "embed"))
        return x, None


class DecoderLayer(nn.Module):
    cfg: WhisperConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x, layer_cache, enc_out, mask, cache_mask, index=None):
        """x: (b, t, d). layer_cache: None (teacher forcing; `mask` causal over x) or this layer's cache slice
        (`cache_mask` marks its written positions, `mask` is causal over the t new tokens, `index` (b,) each
        row's first new position).

        Returns (x, outputs): with a cache, outputs holds this layer's cache arrays "k"/"v" with the new keys and
        values written at `index`, and the cross-attention keys/values only when computed here (the first call).
        The new keys/values are written before the attention reads the cache (the attention still masks the cache
        to its old positions and takes the new ones from k/v, so the numbers are those of attending before the
        write): the write then updates the while-loop's buffer in place, where a read of the old buffer after
        the write made XLA copy every layer's cache twice per decoding step."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hd = c.d_model // c.decoder_heads
        self_attn = Attention(c.decoder_heads, hd, c.d_model, name="self_attn", kernels=self.kernels, **kw)
        cross_attn = Attention(c.decoder_heads, hd, c.d_model, name="cross_attn", kernels=self.kernels, **kw)

        h = LayerNorm(name="self_attn_norm", **kw)(x)
        k, v = self_attn.kv(h)
        outputs = None
        if layer_cache is None:
            x = x + self_attn(h, k, v, mask)
        else:
            k_cache = _write_rows(layer_cache["k"], k, index)
            v_cache = _write_rows(layer_cache["v"], v, index)
            x = x + self_attn.cached(h, k_cache, v_cache, cache_mask, k, v, mask)
            outputs = {"k": k_cache, "v": v_cache}

        h = LayerNorm(name="cross_attn_norm", **kw)(x)
        if layer_cache is not None and layer_cache.get("cross_k") is not None:
            ck, cv = layer_cache["cross_k"], layer_cache["cross_v"]
        else:
            ck, cv = cross_attn.kv(enc_out)
            if outputs is not None:
                outputs.update(cross_k=ck, cross_v=cv)
        x = x + cross_attn(h, ck, cv, None)

        x = x + MLP(c.ffn_dim, name="mlp", **kw)(LayerNorm(name="mlp_norm", **kw)(x))
        x = nn.with_logical_constraint(x, ("batch", "dec_len", "embed"))
        return x, outputs


def _stack(layer_cls, n, scan_layers, remat, in_axes, name, **kw):
    if remat != "none":
        policy = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}[remat]
        layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=False)
    scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                      length=n, unroll=1 if scan_layers else n, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(name=name, **kw)


class Encoder(nn.Module):
    cfg: WhisperConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, mel):
        """mel: (b, n_mels, 2 * n_audio_ctx) log-mel features -> (b, n_audio_ctx, d)."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.swapaxes(mel, 1, 2).astype(self.dtype)
        conv = lambda n, stride, names: nn.Conv(c.d_model, (3,), strides=(stride,), padding=[(1, 1)], name=n,
                                                kernel_init=_init(nn.initializers.lecun_normal(), names),
                                                bias_init=_init(nn.initializers.zeros, ("embed",)), **kw)
        x = nn.gelu(conv("conv1", 1, ("conv_k", "conv_in", "embed"))(x), approximate=False)
        x = nn.gelu(conv("conv2", 2, ("conv_k", "conv_in", "embed"))(x), approximate=False)
        pos = self.param("embed_positions",
                         _init(lambda *_: jnp.asarray(sinusoids(c.n_audio_ctx, c.d_model)), ("enc_len", "embed")),
                         (c.n_audio_ctx, c.d_model), self.param_dtype)
        x = x + pos[: x.shape[1]].astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "enc_len", "embed"))
        x, _ = _stack(EncoderLayer, c.encoder_layers, self.scan_layers, self.remat, (nn.broadcast,), "layers",
                      cfg=c, kernels=self.kernels, **kw)(x, None)
        return LayerNorm(name="final_norm", **kw)(x)


class Decoder(nn.Module):
    cfg: WhisperConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, tokens, enc_out, cache=None, return_hidden=False, logit_positions=None):
        """tokens (b, t). Without a cache: teacher forcing with a causal mask, positions 0..t-1.
        With a cache: tokens go to positions cache["index"] + 0..t-1; returns (logits, new_cache).
        `logit_positions` (b, k) int: logits (and hidden) only at these positions of each row, (b, k, vocab): the
        vocabulary projection is most of a training step's decoder work, and prompt and padding positions have
        no loss."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = nn.Embed(c.vocab_size, c.d_model, name="embed_tokens", param_dtype=self.param_dtype,
                         embedding_init=_init(nn.initializers.normal(0.02), ("vocab", "embed")))
        pos_table = self.param("embed_positions", _init(nn.initializers.normal(0.01), ("dec_len", "embed")),
                               (c.n_text_ctx, c.d_model), self.param_dtype)
        b, t = tokens.shape
        mask = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None, None]       # causal over the t tokens
        if cache is None:
            positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
            cache_mask = None
        else:
            positions = cache["index"][:, None] + jnp.arange(t)[None]
            max_len = cache["k"][0].shape[2]
            cache_mask = (jnp.arange(max_len)[None, :] < cache["index"][:, None])[:, None, None]
        x = embed(tokens).astype(self.dtype) + jnp.take(pos_table, positions, axis=0).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "dec_len", "embed"))
        if cache is None:
            x, _ = _stack(DecoderLayer, c.decoder_layers, self.scan_layers, self.remat,
                          (0, nn.broadcast, nn.broadcast, nn.broadcast), "layers", cfg=c, kernels=self.kernels, **kw)(
                x, None, enc_out, mask, None)
            new_cache = None
        else:
            # Cached decoding runs the layers as a Python loop over static slices of the stacked parameters
            # and per-layer cache arrays: inside a decoding while-loop XLA reads each cache array in place,
            # where a layer scan would copy every layer's parameters and cache slices at every step (2x slower
            # on CPU at base, batch 8). XLA does not hoist the parameter slices out of the loop either (a
            # copy of every layer's weights per step on CPU): decoding loops pass `unstack_decoder(params)`,
            # whose decoder "layers" is already a tuple of per-layer trees.
            layer = DecoderLayer(cfg=c, parent=None, kernels=self.kernels, **kw)
            stacked = self.variables["params"]["layers"]
            first_call = cache.get("cross_k") is None           # the layers compute cross keys/values now
            new_cache = dict(cache, index=cache["index"] + t, k=[], v=[])
            if first_call:
                new_cache.update(cross_k=[], cross_v=[])
            for i in range(c.decoder_layers):
                layer_params = (stacked[i] if isinstance(stacked, (tuple, list))
                                else jax.tree_util.tree_map(lambda a: a[i], stacked))
                layer_cache = {k: (None if cache[k] is None else cache[k][i])
                               for k in ("k", "v", "cross_k", "cross_v")}
                x, out = layer.apply({"params": layer_params}, x, layer_cache, enc_out, mask, cache_mask,
                                     cache["index"])
                for name in ("k", "v"):
                    new_cache[name].append(out[name])
                if first_call:
                    new_cache["cross_k"].append(out["cross_k"])
                    new_cache["cross_v"].append(out["cross_v"])
        if logit_positions is not None:
            x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
        hidden = LayerNorm(name="final_norm", **kw)(x)
        logits = embed.attend(hidden).astype(jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "dec_len", "vocab"))
        if return_hidden:
            return logits, new_cache, hidden
        return logits, new_cache


def unstack_decoder(params):
    """`params` with the decoder's stacked layer parameters split into a tuple of per-layer trees (cached
    decoding only): a decoding while-loop given these reads each layer's weights where they lie, where slicing
    the stacked arrays inside the loop copies all decoder weights at every step (XLA CPU does not hoist those
    slices; 1.3x slower at base, batch 8). Call it outside the loop; idempotent."""
    layers = params["decoder"]["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    per_layer = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], layers) for i in range(n))
    return {**params, "decoder": {**params["decoder"], "layers": per_layer}}


def _write_rows(buf, new, index):
    """buf (b, h, S, hd) with each row's new keys/values (b, h, t, hd) written at that row's position."""
    return jax.vmap(lambda r, n, i: jax.lax.dynamic_update_slice(r, n.astype(r.dtype), (0, i, 0)))(buf, new, index)


class Whisper(nn.Module):
    """The whole model. `apply(params, mel, tokens)` gives teacher-forced logits; `method="encode"` /
    `method="decode"` run the halves (decoding). `kernels`: how it computes (defaults: "auto")."""
    cfg: WhisperConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    kernels: Kernels = Kernels()

    def setup(self):
        kw = dict(cfg=self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                  remat=self.remat, kernels=machine_kernels(self.kernels, self.dtype))
        self.encoder = Encoder(**kw)
        self.decoder = Decoder(**kw)

    def __call__(self, mel, tokens):
        return self.decoder(tokens, self.encoder(mel))[0]

    def encode(self, mel):
        return self.encoder(mel)

    def decode(self, tokens, enc_out, cache=None, return_hidden=False, logit_positions=None):
        return self.decoder(tokens, enc_out, cache, return_hidden, logit_positions)


def encode_batch(model: "Whisper", params, mel, active=None, per_example: Optional[bool] = None):
    """The encoder over a batch: one example at a time (`lax.map`) when `model.kernels` says so (auto: on CPU,
    where each example's activations then stay in cache), else the whole batch at once. `per_example`: force one
    or the other (None: as `model.kernels` says; `dwjax plan` compiles for accelerators on CPU). `active` (b,)
    bool, per-example only: rows where it is False (a last batch's padding) are not encoded (zeros), without a new
    compilation per number of rows."""
    if per_example is None:
        per_example = machine_kernels(model.kernels, model.dtype).encode_per_example
    if not per_example or mel.shape[0] == 1:
        return model.apply({"params": params}, mel, method="encode")
    one = lambda m: model.apply({"params": params}, m[None], method="encode")[0]
    if active is None:
        return jax.lax.map(one, mel)
    c = model.cfg
    zeros = lambda m: jnp.zeros((c.n_audio_ctx, c.d_model), model.dtype)
    return jax.lax.map(lambda ma: jax.lax.cond(ma[1], one, zeros, ma[0]), (mel, jnp.asarray(active, bool)))


def init_cache(cfg: WhisperConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty decoding cache: per decoder layer, self-attention keys/values (batch, heads, max_len, head_dim);
    the cross-attention keys/values (batch, heads, n_audio_ctx, head_dim) are filled by the first `decode` call;
    `index` is each row's next position."""
    hd = cfg.d_model // cfg.decoder_heads
    shape = (batch, cfg.decoder_heads, max_len, hd)
    n = cfg.decoder_layers
    return {"k": [jnp.zeros(shape, dtype) for _ in range(n)], "v": [jnp.zeros(shape, dtype) for _ in range(n)],
            "cross_k": None, "cross_v": None, "index": jnp.zeros((batch,), jnp.int32)}


def init_params(cfg: WhisperConfig, rng=None, **module_kw):
    """Random parameters (unboxed) for `cfg`; use `abstract_params` for shapes and logical axes only."""
    model = Whisper(cfg, **module_kw)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    mel = jnp.zeros((1, cfg.n_mels, 2 * cfg.n_audio_ctx), jnp.float32)
    variables = jax.jit(model.init)(rng, mel, jnp.zeros((1, 1), jnp.int32))
    return nn.unbox(variables["params"])


def abstract_params(cfg: WhisperConfig, **module_kw):
    """ShapeDtypeStructs of the parameters, still boxed with their logical axis names (nn.Partitioned)."""
    model = Whisper(cfg, **module_kw)
    mel = jax.ShapeDtypeStruct((1, cfg.n_mels, 2 * cfg.n_audio_ctx), jnp.float32)
    tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), mel, tok)["params"]


def count_params(params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
