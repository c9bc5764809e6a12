"""How the model computes, never what: the attention kernel, query chunking and per-example encoding.

`Kernels` is a field of the `Whisper` module (and `model.attention`, `model.query_chunk`,
`model.encode_per_example` of the run config, `dwjax/config.py`); its defaults ("auto") reproduce the choices the
model made by itself before. `resolve(backend, dtype_name)` turns "auto" into a concrete choice for a JAX backend
name ("cpu", "gpu", "tpu") and compute dtype; the model calls it with `jax.default_backend()`. DWJAX_ATTENTION (one of
`ATTENTION`) overrides what "auto" resolves to, read here and nowhere else (the accelerator benchmark's A/B).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal, Optional

from dwjax.errors import ConfigError

ENV_ATTENTION = "DWJAX_ATTENTION"
#: unmasked attention: dwjax's query-blocked einsums, or `jax.nn.dot_product_attention` (cuDNN's fused flash kernel,
#: or its XLA implementation, which runs anywhere)
ATTENTION = ("einsum", "cudnn", "xla")
_HALF = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Kernels:
    #: auto: cudnn on NVIDIA GPUs in bfloat16/float16 (the scores never reach memory), einsum elsewhere (XLA fuses
    #: it well on TPU; the query blocks keep each block's scores in cache on CPU)
    attention: Literal["auto", "einsum", "cudnn", "xla"] = "auto"
    #: einsum attention over long unmasked queries (the encoder's 1500 positions) runs in blocks of this many
    #: queries when it divides their number; 0 = one block
    query_chunk: int = 300
    #: encode a batch one example at a time (`lax.map`): the same FLOPs, each example's activations stay in cache
    #: (0.6 s vs 0.96 s per base window at batch 8 on a 2-core CPU). None (auto): on CPU only
    encode_per_example: Optional[bool] = None

    def resolve(self, backend: str, dtype_name: str) -> "Kernels":
        """These kernels with "auto" and None decided for JAX backend `backend` and compute dtype `dtype_name`."""
        attention = self.attention
        if attention == "auto":
            forced = os.environ.get(ENV_ATTENTION, "")
            if forced and forced not in ATTENTION:
                raise ConfigError(f"{ENV_ATTENTION}={forced}: expected one of {', '.join(ATTENTION)}")
            attention = forced or ("cudnn" if backend == "gpu" and dtype_name in _HALF else "einsum")
        per_example = backend == "cpu" if self.encode_per_example is None else self.encode_per_example
        return Kernels(attention, self.query_chunk, per_example)
