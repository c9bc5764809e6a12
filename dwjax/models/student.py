"""Student initialisation (Distil-Whisper §3): the teacher's encoder plus maximally spaced decoder layers.

The student keeps the whole teacher encoder (it stays frozen in training) and copies `n` decoder layers taken at
`floor(linspace(0, L-1, n))` with the last forced to `L-1`, so the first and the last teacher layers are always
kept (2 of 32 -> [0, 31]; 4 of 32 -> [0, 10, 20, 31]). Token and position embeddings and the final norms are
copied as they are. Because dwjax stores layers stacked on a leading axis, choosing layers is one gather along
that axis of every array under `{encoder,decoder}/layers/`.

    cfg_s, params_s = make_student(teacher_cfg, teacher_params, decoder_layers=2)
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from dwjax.errors import ConfigError
from dwjax.models.configs import WhisperConfig


def spaced_layer_ids(n_layers: int, n: int) -> list[int]:
    """`n` maximally spaced layer indices out of `n_layers`: floor(linspace(0, L-1, n)), the last forced to L-1."""
    if not 1 <= n <= n_layers:
        raise ConfigError(f"cannot choose {n} layers out of {n_layers}: give between 1 and {n_layers}")
    ids = np.floor(np.linspace(0, n_layers - 1, n)).astype(int)
    ids[-1] = n_layers - 1
    return [int(i) for i in ids]


def resolve_layer_ids(n_layers: int, count: int | None = None, ids: Sequence[int] | None = None,
                      what: str = "decoder") -> list[int]:
    """Layer ids from an explicit list (checked) or a count (spaced); a count and a list must agree."""
    if ids is None:
        if count is None:
            raise ConfigError(f"give the number of {what} layers or their ids")
        return spaced_layer_ids(n_layers, count)
    ids = [int(i) for i in ids]
    if not ids:
        raise ConfigError(f"the list of {what} layer ids is empty")
    bad = [i for i in ids if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"{what} layer ids {bad} are out of range: the teacher has {n_layers} {what} layers "
                          f"(ids 0..{n_layers - 1})")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{what} layer ids {ids} repeat a layer")
    if count is not None and count != len(ids):
        raise ConfigError(f"{count} {what} layers asked for but {len(ids)} ids given ({ids})")
    return ids


def _take_layers(tree, ids: list[int]):
    index = np.asarray(ids)
    return jax.tree_util.tree_map(lambda x: x[index], tree)


def make_student(teacher_cfg: WhisperConfig, teacher_params: dict, *, decoder_layers: int | None = None,
                 decoder_layer_ids: Sequence[int] | None = None, encoder_layers: int | None = None,
                 encoder_layer_ids: Sequence[int] | None = None) -> tuple[WhisperConfig, dict]:
    """(student_cfg, student_params) from an (unboxed) teacher parameter tree.

    Decoder: `decoder_layer_ids` if given, else `decoder_layers` spaced layers. Encoder: the whole teacher encoder
    unless `encoder_layers` (spaced) or `encoder_layer_ids` is given. Arrays are sliced, not copied, where the
    input type allows (numpy views / jax gathers); save or `jax.device_put` the result as needed.
    """
    ids = student_layer_ids(teacher_cfg, decoder_layers=decoder_layers, decoder_layer_ids=decoder_layer_ids,
                            encoder_layers=encoder_layers, encoder_layer_ids=encoder_layer_ids)
    enc_ids, dec_ids = ids["encoder"], ids["decoder"]
    cfg = teacher_cfg.replace(encoder_layers=len(enc_ids), decoder_layers=len(dec_ids))

    def side(name, ids, n_teacher):
        sub = dict(teacher_params[name])
        if ids != list(range(n_teacher)):
            sub["layers"] = _take_layers(sub["layers"], ids)
        return sub

    params = {"encoder": side("encoder", enc_ids, teacher_cfg.encoder_layers),
              "decoder": side("decoder", dec_ids, teacher_cfg.decoder_layers)}
    return cfg, params


def student_layer_ids(teacher_cfg: WhisperConfig, *, decoder_layers: int | None = None,
                      decoder_layer_ids: Sequence[int] | None = None, encoder_layers: int | None = None,
                      encoder_layer_ids: Sequence[int] | None = None) -> dict[str, list[int]]:
    """The teacher layer ids `make_student` takes for these arguments: {"encoder": [...], "decoder": [...]}."""
    dec = resolve_layer_ids(teacher_cfg.decoder_layers, decoder_layers, decoder_layer_ids, "decoder")
    if encoder_layers is None and encoder_layer_ids is None:
        enc = list(range(teacher_cfg.encoder_layers))
    else:
        enc = resolve_layer_ids(teacher_cfg.encoder_layers, encoder_layers, encoder_layer_ids, "encoder")
    return {"encoder": enc, "decoder": dec}
