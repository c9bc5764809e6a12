"""Training checkpoints on Orbax: sharded, asynchronous, verified, and restorable onto any mesh.

Modules: `layout.py` (the names in a step directory, step listing from disk), `integrity.py` (the manifest),
`restore.py` (the target a state is restored into, on any mesh), `manager.py` (`Checkpointer`: save policy,
retention, save and restore), `preemption.py` (SIGTERM and the stop every process agrees on), `start.py`
(`resolve_start`). Each imports only those named before it.

Where a run starts from (`resolve_start`), first match wins:

    1. this run's checkpoint     <run.output_dir>/checkpoints/<latest complete step>   (exact resume: params,
                                 optimizer state, step, rng and the data position)
    2. checkpoint.init_from      a run directory, its checkpoints/ directory, or one step directory
                                 (parameters only; optimizer, step and data order start afresh)
    3. converted weights         model.student, the directory `dwjax init-student` wrote
    4. none of these             "fresh": `resolve_start` reports it. `dwjax distill` never starts there: it
                                 needs model.student in every case (the student's shape and tokenizer, on a
                                 resume too) and refuses a run without it with one line before asking, so for it
                                 the order ends at 3 (a student starts from `dwjax init-student`, never from
                                 random weights)

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
from dwjax.checkpoint.layout import MANIFEST_NAME, TMP_SUFFIX, CheckpointSummary, checkpoint_dir, list_checkpoints
from dwjax.checkpoint.integrity import CheckpointCorruptError, verify_step_dir, write_manifest
from dwjax.checkpoint.manager import CheckpointFallbackWarning, Checkpointer
from dwjax.checkpoint.preemption import install_preemption_handler, request_stop, reset_stop, should_stop
from dwjax.checkpoint.start import StartPoint, resolve_start

__all__ = ["MANIFEST_NAME", "TMP_SUFFIX", "CheckpointCorruptError", "CheckpointFallbackWarning", "CheckpointSummary",
           "Checkpointer", "StartPoint", "checkpoint_dir", "install_preemption_handler", "list_checkpoints",
           "request_stop", "reset_stop", "resolve_start", "should_stop", "verify_step_dir", "write_manifest"]
