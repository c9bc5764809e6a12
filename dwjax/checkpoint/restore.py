"""Restoring onto any topology: the target a saved state is read into (shapes and dtypes from the state to restore,
shardings from it or given, so orbax reshards onto the current mesh), checked against the checkpoint's tree; and
a failed read as one line (with the noise orbax's abandoned reads leave behind silenced)."""
from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dwjax.checkpoint.integrity import CheckpointCorruptError
from dwjax.checkpoint.layout import MANIFEST_NAME, STATE_ITEM
from dwjax.errors import CheckpointError


def short_error(e: BaseException, limit: int = 160) -> str:
    """An orbax/tensorstore error as one short line (their messages run to kilobytes of specs)."""
    text = " ".join(str(e).split())
    text = text.split(" See full TensorStore details")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_orbax_read_noise(unraisable) -> bool:
    """What a failed orbax restore leaves behind: its pending tensorstore reads complete after orbax's event loop
    closed ("Event loop is closed", raised in tensorstore's callback threads) and the read coroutines that never
    got awaited are collected with their error. Both reach `sys.unraisablehook` (one traceback each, ~140 for a
    small model); the restore itself already raised and was reported."""
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and obj is None:
        return True
    filename = getattr(getattr(obj, "cr_code", None), "co_filename", "") or ""
    return "orbax" in filename or "tensorstore" in filename


class _QuietOrbaxReadTasks(logging.Filter):
    """Drops asyncio's "<Task | _GatheringFuture | Future> exception was never retrieved" for orbax's abandoned
    reads of a failed restore (logged when the task or future is collected, with a traceback; the restore itself
    already raised and was reported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in str(record.msg).split("\n")[0]:
            return True
        future = getattr(record, "future", None) or (record.args.get("future") if isinstance(record.args, dict)
                                                    else None)
        text = f"{record.getMessage()} {future!r}"
        return not ("orbax" in text or "tensorstore" in text or "TensorStore" in text)


def _silence_orbax_read_noise() -> None:
    """Install (once) an unraisable hook dropping `_is_orbax_read_noise` (everything else goes to the old hook) and
    a filter on the asyncio logger dropping orbax's abandoned read tasks."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _QuietOrbaxReadTasks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_QuietOrbaxReadTasks())
    previous = sys.unraisablehook
    if getattr(previous, "_dwjax_filter", False):
        return

    def hook(unraisable):
        if not _is_orbax_read_noise(unraisable):
            previous(unraisable)
    hook._dwjax_filter = True
    sys.unraisablehook = hook


def read_failure(step_dir: Path, e: BaseException, checked: bool) -> CheckpointCorruptError:
    """The one-line error for a step orbax could not read (`checked`: its files had passed the manifest check).
    Silences the tracebacks of the read's abandoned coroutines and collects them now, not in the middle of
    training."""
    _silence_orbax_read_noise()
    gc.collect()
    why = "" if checked else f" (it has no {MANIFEST_NAME} integrity record, so it was not checked first)"
    return CheckpointCorruptError(f"checkpoint {step_dir} could not be read{why}: {type(e).__name__}: "
                                  f"{short_error(e)}")


def saved_tree(manager: ocp.CheckpointManager, step: int, step_dir: Path) -> Any:
    """The saved state's tree of array metadata (shapes, dtypes) at `step`, as orbax reads it."""
    try:
        return manager.item_metadata(step)[STATE_ITEM].tree
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for unreadable metadata
        raise CheckpointCorruptError(f"checkpoint {step_dir}: cannot read {step_dir / STATE_ITEM / '_METADATA'}: "
                                     f"{type(e).__name__}: {short_error(e)}") from e


def _replicated_everywhere() -> NamedSharding:
    return NamedSharding(Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())


def _is_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_struct(leaf: Any, sharding: Any, default: jax.sharding.Sharding, own: bool = True) -> jax.ShapeDtypeStruct:
    """`leaf` as a ShapeDtypeStruct with `sharding`, else (if `own`) the leaf's own, else `default`."""
    if sharding is None and own:
        sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, Mesh):
        sharding = NamedSharding(sharding, PartitionSpec())
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=sharding or default)


def restore_target(saved: Any, step_dir: Path, abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs (with target shardings) to restore `saved` (`saved_tree`) into; with an `abstract_state`,
    its names and shapes are checked against the checkpoint's (`CheckpointError` naming the first differences).
    `abstract_state` and `shardings` as `Checkpointer.restore` takes them."""
    default = _replicated_everywhere()
    broadcast = shardings is None or isinstance(shardings, (jax.sharding.Sharding, Mesh))
    if abstract_state is None:
        return jax.tree.map(lambda m: _leaf_struct(m, shardings if broadcast else None, default, own=False),
                            saved,
                            is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    if broadcast:
        target = jax.tree.map(lambda x: _leaf_struct(x, shardings, default), abstract_state)
    else:
        target = jax.tree.map(lambda x, s: _leaf_struct(x, s, default), abstract_state, shardings)
    want = ocp.tree.to_flat_dict(target, sep="/")
    have = ocp.tree.to_flat_dict(saved, sep="/")
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        parts = ([f"not in the checkpoint: {', '.join(missing[:5])}"] if missing else []) + \
                ([f"only in the checkpoint: {', '.join(extra[:5])}"] if extra else [])
        raise CheckpointError(f"checkpoint {step_dir} does not match the state to restore ({'; '.join(parts)})")
    for name, struct in want.items():
        if _is_key(struct.dtype):
            continue
        if tuple(have[name].shape) != tuple(struct.shape):
            raise CheckpointError(f"checkpoint {step_dir}: {name} has shape {tuple(have[name].shape)} in the "
                                  f"checkpoint but {tuple(struct.shape)} in the state to restore")
    return target
