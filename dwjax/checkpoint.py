"""Training checkpoints on Orbax: sharded, asynchronous, verified, and restorable onto any mesh.

Where a run starts from (`resolve_start`), first match wins:

    1. this run's checkpoint     <run.output_dir>/checkpoints/<latest complete step>   (exact resume: params,
                                 optimizer state, step, rng and the data position)
    2. checkpoint.init_from      a run directory, its checkpoints/ directory, or one step directory
                                 (parameters only; optimizer, step and data order start afresh)
    3. converted weights         model.student, the directory `dwjax init-student` wrote
    4. none of these             "fresh": `resolve_start` reports it, and `dwjax distill` refuses it with one
                                 line (a student starts from `dwjax init-student`, never from random weights)

Layout of a checkpoint directory (one sub-directory per step; orbax writes it, we add `dwjax_manifest.json`):

    checkpoints/
      metadata/                     orbax root metadata (written once)
      2000/                         one step; complete once renamed from 2000.orbax-checkpoint-tmp
        _CHECKPOINT_METADATA        orbax step metadata (init and commit timestamps, item handlers)
        commit_success.txt          orbax commit marker
        state/                      the state pytree (params, optimizer state, step, rng): OCDBT/tensorstore,
                                    each process writes its own shards (ocdbt.process_<i>/), _sharding,
                                    _METADATA (tree structure, shapes, dtypes)
        data_position/metadata      JSON: where the data loader is (e.g. {"step": 2000, "seed": 0})
        meta/metadata               JSON: step, time, dwjax version, resolved config, topology
                                    (process count, device count, device kind, mesh shape), metrics
        metrics/metrics             JSON: the metrics passed to `save` (orbax ranks best-K on them)
        dwjax_manifest.json         size and CRC-32 of every other file, written before the commit

Integrity.
  * Interrupted writes are never picked: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to
    `<step>` only after every process finished writing (POSIX atomic rename; on GCS, `commit_success.txt`). Step
    listing ignores tmp directories, and `Checkpointer(...)` deletes leftovers from a killed run. Tests kill -9 a
    process mid-save and check the previous step is the one restored.
  * Truncated or corrupted files are NOT noticed by orbax/tensorstore (a data file cut in half restores
    silently with old values in our tests). So after all processes finished writing and before the commit
    rename, process 0 records every file's size and CRC-32 in `dwjax_manifest.json` (orbax's
    post-finalization callback, run in the background thread); `restore` checks them first and raises
    `CheckpointCorruptError` (a `CheckpointError`) naming the file. `restore_latest_valid` then falls back to
    the previous step with a warning. A checkpoint without a manifest (a crash between manifest and commit is
    not possible; a checkpoint written by another tool is) is restored unchecked.

Retention: orbax's `AnyPreservationPolicy(LatestN(keep_last), BestN(keep_best))` keeps the union of the last
`keep_last` steps and the `keep_best` steps with the lowest `metrics[best_metric]` (validation WER, lower is
better); steps saved without that metric never count as best. Deletion happens when a save finalises.

Saving is always orbax's AsyncCheckpointer (device->host copy blocks; the file writes run in a thread); with
`checkpoint.async_save: false`, `save` waits for the write to finish before returning.

Preemption: `install_preemption_handler()` makes SIGTERM set a flag; the loop calls `should_stop(step)` each step
and, when true, saves with `force=True` and exits. Multi-process runs must agree on the step: there
`should_stop` uses JAX's preemption sync point (`reached_preemption_sync_point`) when the preemption service runs,
else an all-gather of every process's flag. Loop pattern:

    ckpt = Checkpointer(checkpoint_dir(cfg.run.output_dir), cfg.checkpoint, run_config=cfg)
    install_preemption_handler()
    for step in range(start, total):
        state = train_step(state, batch)
        stop = should_stop(step)
        ckpt.save(step, state, data_position={"step": step}, metrics=eval_metrics, force=stop)
        if stop:
            break
    ckpt.close()
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import signal
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as ocp_preservation
from orbax.checkpoint._src.checkpoint_managers import save_decision_policy as ocp_save_policy

import dwjax
from dwjax.config import CheckpointConfig, Config, to_dict
from dwjax.errors import CheckpointError

log = logging.getLogger(__name__)


class _QuietAbsl(logging.Filter):
    """Drops orbax's warning on every save without metrics (we set best_fn for `keep_best`, and steps saved before
    the first evaluation have none: they simply never count as best)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Requested `tracked_metric`; did not provide metrics")


logging.getLogger("absl").addFilter(_QuietAbsl())

#: item names inside a step directory
STATE_ITEM, DATA_ITEM, META_ITEM = "state", "data_position", "meta"
#: the file (in each step directory) listing every other file's size and CRC-32
MANIFEST_NAME = "dwjax_manifest.json"
#: orbax's suffix of a step directory still being written
TMP_SUFFIX = ".orbax-checkpoint-tmp"
#: metric that ranks checkpoints for `keep_best` (lower is better)
BEST_METRIC = "wer"
#: files orbax may rewrite at commit time (after our manifest), so the manifest leaves them out
_UNCHECKED = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST_NAME})


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files are missing, truncated or altered since they were written."""


class CheckpointFallbackWarning(RuntimeWarning):
    """`restore_latest_valid` skipped a damaged step (one line: which step and why)."""


def _short(e: BaseException, limit: int = 160) -> str:
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
    import sys
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


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints: `<run.output_dir>/checkpoints`."""
    return Path(output_dir) / "checkpoints"


# ----------------------------------------------------------------------------------------------------- manifest


def _crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _checked_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in _UNCHECKED)


def write_manifest(step_dir: str | os.PathLike) -> Path:
    """Record size and CRC-32 of every file under `step_dir` (except orbax's commit files) in the manifest."""
    step_dir = Path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "crc32": _crc32(p)}
             for p in _checked_files(step_dir)}
    target = step_dir / MANIFEST_NAME
    tmp = step_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, target)
    return target


def verify_step_dir(step_dir: str | os.PathLike, full: bool = True) -> bool:
    """Check a step directory against its manifest; True if checked, False if it has no manifest.

    `full=False` checks presence and sizes only (fast); `full=True` also the CRC-32 of every byte.
    Raises `CheckpointCorruptError` naming the first bad file."""
    step_dir = Path(step_dir)
    manifest = step_dir / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: {manifest} is unreadable ({e})") from None
    for rel, want in sorted(files.items()):
        path = step_dir / rel
        if not path.is_file():
            raise CheckpointCorruptError(f"checkpoint {step_dir} is incomplete: file {path} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "longer than written"
            raise CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: file {path} is {size} bytes, "
                                         f"{want['size']} were written ({what})")
        if full and _crc32(path) != want["crc32"]:
            raise CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: file {path} has changed since it "
                                         f"was written (CRC-32 mismatch)")
    return True


# ----------------------------------------------------------------------------------------------------- helpers


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


# ----------------------------------------------------------------------------------------------------- preemption


class _Preemption:
    flag = threading.Event()
    previous: dict[int, Any] = {}


def _preemption_service_active() -> bool:
    """Whether JAX's multi-process preemption sync manager runs (it handles SIGTERM itself)."""
    try:
        from jax._src import distributed
        return jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def install_preemption_handler(signals=(signal.SIGTERM,)) -> Callable[[], None]:
    """Make `signals` (default SIGTERM) set the flag `should_stop` reads; returns a function restoring the old handlers.

    A Python handler that was installed before keeps being called. Where JAX's multi-process preemption service
    runs, it already catches SIGTERM and agrees on a step across processes: no handler is installed then, and
    `should_stop(step)` asks the sync point. Call from the main thread.
    """
    if _preemption_service_active():
        log.info("JAX preemption service active: SIGTERM is handled by its sync point")
        return lambda: None
    installed: dict[int, Any] = {}

    def handler(signum, frame):
        _Preemption.flag.set()
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        previous = installed.get(signum)
        if callable(previous):
            previous(signum, frame)

    for sig in signals:
        installed[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, previous in installed.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    return restore


def request_stop() -> None:
    """Set the stop flag as SIGTERM would (e.g. from a time limit)."""
    _Preemption.flag.set()


def reset_stop() -> None:
    """Clear the stop flag."""
    _Preemption.flag.clear()


def should_stop(step: int | None = None) -> bool:
    """Whether the loop should save now and exit. All processes get the same answer for the same step.

    Multi-process: call it on every process at every step (it is a sync point or a small collective)."""
    local = _Preemption.flag.is_set()
    if jax.process_count() == 1:
        return local
    if _preemption_service_active() and step is not None:
        from jax.experimental import multihost_utils
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step)) or local
        except RuntimeError:  # the service was disabled after all
            pass
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([local], np.int32))
    return bool(np.any(flags))


# ----------------------------------------------------------------------------------------------------- checkpointer


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    """One step directory as found on disk (see `list_checkpoints`)."""
    step: int
    path: Path
    complete: bool                    # committed (renamed from the tmp directory)
    size_bytes: int
    time: str | None                  # commit time (UTC, ISO 8601), else the time the write started
    metrics: dict | None
    topology: dict | None
    dwjax_version: str | None
    has_manifest: bool


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
            save_decision_policy=ocp_save_policy.AnySavePolicy([
                ocp_save_policy.FixedIntervalPolicy(cfg.save_every),
                ocp_save_policy.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=ocp_preservation.AnyPreservationPolicy([
                ocp_preservation.LatestN(n=cfg.keep_last),
                ocp_preservation.BestN(get_metric_fn=self._score, reverse=True, n=cfg.keep_best,
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

    def _saved_tree(self, step: int) -> Any:
        try:
            return self._mgr.item_metadata(step)[STATE_ITEM].tree
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for unreadable metadata
            path = self.step_dir(step) / STATE_ITEM / "_METADATA"
            raise CheckpointCorruptError(f"checkpoint {self.step_dir(step)}: cannot read {path}: "
                                         f"{type(e).__name__}: {_short(e)}") from e

    def _target(self, step: int, abstract_state: Any, shardings: Any) -> Any:
        """ShapeDtypeStructs (with target shardings) to restore into; shapes checked against the checkpoint."""
        default = _replicated_everywhere()
        saved = self._saved_tree(step)
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
            raise CheckpointError(f"checkpoint {self.step_dir(step)} does not match the state to restore ("
                                  f"{'; '.join(parts)})")
        for name, struct in want.items():
            if _is_key(struct.dtype):
                continue
            if tuple(have[name].shape) != tuple(struct.shape):
                raise CheckpointError(f"checkpoint {self.step_dir(step)}: {name} has shape {tuple(have[name].shape)}"
                                      f" in the checkpoint but {tuple(struct.shape)} in the state to restore")
        return target

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
        target = self._target(step, abstract_state, shardings)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target),
                                     DATA_ITEM: ocp.args.JsonRestore(), META_ITEM: ocp.args.JsonRestore()})
        try:
            out = self._mgr.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax errors for unreadable data vary
            _silence_orbax_read_noise()
            import gc
            gc.collect()          # the abandoned read coroutines go now, not in the middle of training
            why = "" if checked else f" (it has no {MANIFEST_NAME} integrity record, so it was not checked first)"
            raise CheckpointCorruptError(f"checkpoint {self.step_dir(step)} could not be read{why}: "
                                         f"{type(e).__name__}: {_short(e)}") from e
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


# ----------------------------------------------------------------------------------------------------- listing


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _step_of(name: str) -> int | None:
    head = name.split(TMP_SUFFIX)[0]
    return int(head) if head.isdigit() else None


def list_checkpoints(directory: str | os.PathLike) -> list[CheckpointSummary]:
    """Every step directory under `directory` (a checkpoints directory or a run directory holding one),
    committed or not, read straight from disk (no orbax manager, nothing deleted), by step."""
    directory = Path(directory)
    if not any(_step_of(p.name) is not None for p in directory.iterdir() if p.is_dir()) and \
            checkpoint_dir(directory).is_dir():
        directory = checkpoint_dir(directory)
    out = []
    for path in directory.iterdir():
        step = _step_of(path.name)
        if step is None or not path.is_dir():
            continue
        complete = TMP_SUFFIX not in path.name
        meta = _read_json(path / META_ITEM / "metadata") or {}
        orbax_meta = _read_json(path / "_CHECKPOINT_METADATA") or {}
        nsecs = orbax_meta.get("commit_timestamp_nsecs") or orbax_meta.get("init_timestamp_nsecs")
        when = (datetime.datetime.fromtimestamp(nsecs / 1e9, datetime.timezone.utc).isoformat(timespec="seconds")
                if nsecs else meta.get("time"))
        metrics = _read_json(path / "metrics" / "metrics") or meta.get("metrics")
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        out.append(CheckpointSummary(step=step, path=path, complete=complete, size_bytes=size, time=when,
                                     metrics=metrics, topology=meta.get("topology"),
                                     dwjax_version=meta.get("dwjax_version"),
                                     has_manifest=(path / MANIFEST_NAME).is_file()))
    return sorted(out, key=lambda s: (s.step, s.complete))


# ----------------------------------------------------------------------------------------------------- start


@dataclasses.dataclass(frozen=True)
class StartPoint:
    """Where training starts: `kind` is "resume", "init_from", "weights" or "fresh"."""
    kind: Literal["resume", "init_from", "weights", "fresh"]
    path: Path | None = None      # the checkpoints directory (resume/init_from) or the weights directory
    step: int | None = None       # the step to restore (resume/init_from)


def _committed_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(s for p in directory.iterdir()
                  if p.is_dir() and (s := _step_of(p.name)) is not None and TMP_SUFFIX not in p.name)


def _locate_init_from(init_from: str) -> tuple[Path, int]:
    """(checkpoints directory, step) for `checkpoint.init_from`: a step dir, a checkpoints dir or a run dir."""
    path = Path(init_from)
    if not path.exists():
        raise CheckpointError(f"checkpoint.init_from={init_from}: no such directory")
    step = _step_of(path.name)
    if step is not None and TMP_SUFFIX not in path.name and (path / STATE_ITEM).is_dir():
        return path.parent.absolute(), step
    for directory in (path, checkpoint_dir(path)):
        steps = _committed_steps(directory)
        if steps:
            return directory.absolute(), steps[-1]
    raise CheckpointError(f"checkpoint.init_from={init_from}: no complete checkpoint there (expected a step "
                          f"directory, a checkpoints directory or a run directory)")


def resolve_start(output_dir: str | os.PathLike, cfg: Config | CheckpointConfig) -> StartPoint:
    """Which start applies (module docstring): this run's checkpoint, init_from, converted weights, fresh.

    With a bare `CheckpointConfig`, the converted-weights step (model.student) is not known and is skipped."""
    steps = _committed_steps(checkpoint_dir(output_dir))
    if steps:
        return StartPoint("resume", checkpoint_dir(output_dir).absolute(), steps[-1])
    ckpt_cfg = cfg.checkpoint if isinstance(cfg, Config) else cfg
    if ckpt_cfg.init_from:
        directory, step = _locate_init_from(ckpt_cfg.init_from)
        return StartPoint("init_from", directory, step)
    student = cfg.model.student if isinstance(cfg, Config) else None
    if student:
        return StartPoint("weights", Path(student))
    return StartPoint("fresh")
