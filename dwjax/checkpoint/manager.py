"""`Checkpointer`: one orbax `CheckpointManager` per checkpoints directory: the save policy (every
`checkpoint.save_every` steps and at a preemption sync point), retention (the last `keep_last` and the `keep_best`
lowest-WER steps), asynchronous sharded saves with each step's data position, metadata and integrity manifest,
and restores (verified, resharded onto the current mesh, falling back past damaged steps)."""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

import dwjax
from dwjax.checkpoint.integrity import CheckpointCorruptError, verify_step_dir, write_manifest
from dwjax.checkpoint.layout import DATA_ITEM, META_ITEM, STATE_ITEM, TMP_SUFFIX
from dwjax.checkpoint.restore import read_failure, restore_target, saved_tree
from dwjax.config import CheckpointConfig, Config, to_dict
from dwjax.errors import CheckpointError

log = logging.getLogger(__name__)


class _QuietAbsl(logging.Filter):
    """Drops orbax's warning on every save without metrics (we set best_fn for `keep_best`, and steps saved before
    the first evaluation have none: they simply never count as best)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Requested `tracked_metric`; did not provide metrics")


logging.getLogger("absl").addFilter(_QuietAbsl())

#: metric that ranks checkpoints for `keep_best` (lower is better)
BEST_METRIC = "wer"


class CheckpointFallbackWarning(RuntimeWarning):
    """`restore_latest_valid` skipped a damaged step (one line: which step and why)."""


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON: arrays and numpy scalars become floats/ints/lists, mappings recurse."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(value)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return value


def _mesh_shape(tree: Any) -> dict[str, int] | None:
    """The mesh shape of the first leaf that lives on a named mesh, else None."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return {str(k): int(v) for k, v in sharding.mesh.shape.items()}
    return None


def topology(state: Any = None) -> dict[str, Any]:
    """Processes, devices and (when `state` lives on a named mesh) the mesh shape of this run."""
    return {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "mesh": _mesh_shape(state)}


class Checkpointer:
    """Save and restore training state under `directory` (one orbax `CheckpointManager`).

    `cfg` is the `checkpoint` section (or the whole `Config`, whose sections are then recorded in each
    checkpoint's metadata). `best_metric` names the metric (lower is better) that ranks `keep_best`.
    `read_only=True` opens a directory for restoring only (no clean-up of tmp directories).
    """

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig | Config, *,
                 run_config: Config | None = None, best_metric: str = BEST_METRIC, read_only: bool = False):
        if isinstance(cfg, Config):
            run_config, cfg = run_config or cfg, cfg.checkpoint
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self.best_metric = best_metric
        self.read_only = read_only
        self._run_config = to_dict(run_config) if run_config is not None else {"checkpoint": to_dict(cfg)}
        self._pending_step: int | None = None
        self.skipped: list[tuple[int, str]] = []     # (step, reason) of steps the last restore_latest_valid skipped
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE_ITEM, ocp.args.StandardSave)
        registry.add(STATE_ITEM, ocp.args.StandardRestore)
        for item in (DATA_ITEM, META_ITEM):
            registry.add(item, ocp.args.JsonSave)
            registry.add(item, ocp.args.JsonRestore)
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(cfg.save_every),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
                ocp.checkpoint_managers.LatestN(n=cfg.keep_last),
                ocp.checkpoint_managers.BestN(get_metric_fn=self._score, reverse=True, n=cfg.keep_best,
                                              keep_checkpoints_without_metrics=False),
            ]),
            best_fn=self._score,  # makes orbax write metrics/metrics and rank by it
            best_mode="min",
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._on_written),
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # -------------------------------------------------------------------------------------------- saving

    def _score(self, metrics: Any) -> float:
        value = metrics.get(self.best_metric) if isinstance(metrics, dict) else None
        try:
            value = float(value)
        except (TypeError, ValueError):
            return math.inf
        return value if math.isfinite(value) else math.inf

    def _on_written(self) -> None:
        """Orbax post-finalization callback (process 0, background thread, before the commit rename)."""
        step = self._pending_step
        if step is None:
            return
        try:
            candidates = sorted(self.directory.glob(f"{step}{TMP_SUFFIX}*"))
            step_dir = candidates[-1] if candidates else self.directory / str(step)
            write_manifest(step_dir)
        except Exception as e:  # noqa: BLE001 - never fail a save over its manifest; restore just can't check it
            log.warning("could not write the manifest of checkpoint step %s: %s", step, e)

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without `force` would write (interval or preemption sync point)."""
        return not self.read_only and self._mgr.should_save(step)

    def save(self, step: int, state: Any, data_position: dict, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Save `state` (any pytree of arrays), the data position and metadata if `step` is due (or `force`).

        Returns whether a checkpoint was started. Blocks only for the device->host copy unless
        `checkpoint.async_save` is false. A step that already has a checkpoint is not written again."""
        if self.read_only:
            raise CheckpointError(f"checkpoint directory {self.directory} was opened read-only")
        step = int(step)
        if step in self._mgr.all_steps() or not (force or self._mgr.should_save(step)):
            return False
        try:
            data_position = json.loads(json.dumps(_jsonable(dict(data_position))))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"data_position must be JSON-serialisable: {e}") from None
        metrics = _jsonable(dict(metrics)) if metrics is not None else None
        meta = {
            "step": step,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dwjax_version": dwjax.__version__,
            "topology": topology(state),
            "metrics": metrics,
            "config": self._run_config,
        }
        self._mgr.wait_until_finished()  # the manifest callback of the previous save must see its own step
        self._pending_step = step
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                     DATA_ITEM: ocp.args.JsonSave(data_position),
                                     META_ITEM: ocp.args.JsonSave(meta)})
        saved = self._mgr.save(step, args=args, metrics=metrics, force=True)
        if saved and not self.cfg.async_save:
            self.wait_until_finished()
        return bool(saved)

    def wait_until_finished(self) -> None:
        """Block until the checkpoint being written (if any) is committed; re-raise its error if it failed."""
        self._mgr.wait_until_finished()
        self._mgr.check_for_errors()

    def close(self) -> None:
        """Finish writing, delete what retention drops, release orbax's threads."""
        self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- listing

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (tmp directories of interrupted writes are never listed)."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        """The committed step with the lowest `best_metric` (the latest if none has it)."""
        return self._mgr.best_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(int(step))

    def verify(self, step: int, full: bool = True) -> bool:
        """Check step `step` against its manifest (see `verify_step_dir`)."""
        return verify_step_dir(self.step_dir(step), full=full)

    # -------------------------------------------------------------------------------------------- restoring

    def restore(self, step: int | None = None, abstract_state: Any = None, shardings: Any = None, *,
                verify: bool = True) -> tuple[Any, dict, dict]:
        """Restore step `step` (default: the latest) as `(state, data_position, metadata)`.

        `abstract_state`: the state's structure as a pytree of `jax.ShapeDtypeStruct` (or arrays), e.g.
        `jax.eval_shape(init_fn)`; leaves that carry a `sharding` are restored with it (orbax reshards, so any
        mesh works). `shardings`: a pytree of shardings matching `abstract_state`, or one `Sharding`/`Mesh` for
        every leaf (a Mesh = replicated on it); overrides the leaves' own. Leaves without either are
        replicated on all devices. With `abstract_state=None` the structure is read from the checkpoint
        (tuples and named tuples come back as lists). Dtypes follow `abstract_state` (orbax casts).
        `verify`: check every file against the manifest first (reads the whole checkpoint once).
        Raises `CheckpointCorruptError` for a damaged checkpoint, `CheckpointError` for a mismatch.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            step = steps[-1]
        step = int(step)
        if step not in steps:
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}; "
                                  f"available: {', '.join(map(str, steps)) or 'none'}")
        checked = self.verify(step, full=True) if verify else False
        target = restore_target(saved_tree(self._mgr, step, self.step_dir(step)), self.step_dir(step),
                                abstract_state, shardings)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target),
                                     DATA_ITEM: ocp.args.JsonRestore(), META_ITEM: ocp.args.JsonRestore()})
        try:
            out = self._mgr.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax errors for unreadable data vary
            raise read_failure(self.step_dir(step), e, checked) from e
        return out[STATE_ITEM], dict(out[DATA_ITEM] or {}), dict(out[META_ITEM] or {})

    def restore_latest_valid(self, abstract_state: Any = None, shardings: Any = None, *,
                             verify: bool = True) -> tuple[Any, dict, dict]:
        """`restore` the newest step that is intact, warning (`CheckpointFallbackWarning`, one line each) about
        each damaged newer step it skips; `self.skipped` lists them as (step, reason)."""
        failures = []
        self.skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state, shardings, verify=verify)
            except CheckpointCorruptError as e:
                warnings.warn(CheckpointFallbackWarning(f"{e}; falling back to the previous checkpoint"),
                              stacklevel=2)
                self.skipped.append((step, str(e)))
                failures.append(str(e))
        if not failures:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        raise CheckpointError(f"no intact checkpoint in {self.directory}: " + " | ".join(failures))

