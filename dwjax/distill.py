"""The distillation run: `run(cfg)` is what `dwjax distill` does.

    teacher (frozen) + student (from `dwjax init-student`) + pseudo-labelled sets
      -> sharded train steps (dwjax/train_step.py) over a (data, fsdp, tensor) mesh
      -> metrics (stdout, JSONL, TensorBoard), evaluation (WER of generated text, KL at T=1), checkpoints
      -> <output_dir>/student: the final student as a dwjax model directory (loadable everywhere).

`run` builds what the loop needs (data, models, the sharded steps, the start state) and hands the loop to
dwjax/trainer.py's `Trainer` with four hooks, in this order: the batch log (every step), training metrics
(`_TrainLog`, every train.log_every steps), evaluation (every eval.every steps and at the end), checkpoints
(every step: the Checkpointer saves every checkpoint.save_every steps, at the end and on a stop, ranked by the
evaluation of that step when there is one).

Start (dwjax/checkpoint/__init__.py): this run's newest complete checkpoint -> checkpoint.init_from -> model.student.
The data stream is a function of (data.seed, step), so a resumed run sees exactly the batches it would have seen.

Packed label rows (`dwjax pseudo-label --pack`) train on their windows (dwjax/data/loader.py: window audio,
timestamps, previous-window prompts). Each batch is padded to its longest label rounded up to `data.label_bucket`
and the logits are computed only at the positions with a loss (`target_positions`, in quarters of that length): the
step compiles once per (length, logit positions) met; the summary's `label_lengths` and `step_shapes` list them.
With `train.encoder_cache` the
teacher encoder's output is computed once per row before training and read from disk afterwards
(dwjax/data/encoder_cache.py); the step then runs no encoder.
"""
from __future__ import annotations

import concurrent.futures as futures
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dwjax import checkpoint as ckpt_lib
from dwjax import mesh as mesh_lib
from dwjax.audio import N_SAMPLES, log_mel_spectrogram
from dwjax.config import Config, to_dict, to_yaml
from dwjax.data.encoder_cache import numpy_dtype, open_cache, teacher_fingerprint
from dwjax.data.loader import (LabelEncoder, TrainBatches, label_length, read_labelled, row_audio,
                               run_on_windows)
from dwjax.data.label_filter import LabelFilter, format_counts
from dwjax.errors import UserError, WeightsError
from dwjax.flops import peak_flops, train_step_flops
from dwjax.metrics import MetricsWriter
from dwjax.trainer import Progress, StepInfo, Trainer
from dwjax.train_step import make_sharded_train_step, shares_encoder
from dwjax.training_eval import GreedyWer, TeacherForced, load_eval_sets, mean_student_wer
from dwjax.weights.loading import LoadedModel, load_model, save_dwjax

class Features:
    """Log-mel features of a global batch, computed where the batch lives: each device its own rows (jitted once),
    rather than the whole local batch on one device."""

    def __init__(self, n_mels: int, sharding):
        self.sharding = sharding
        self.fn = jax.jit(lambda a: log_mel_spectrogram(a, n_mels=n_mels), in_shardings=sharding,
                          out_shardings=sharding)

    def __call__(self, local_audio: np.ndarray) -> jax.Array:
        return self.fn(jax.make_array_from_process_local_data(self.sharding, np.asarray(local_audio)))


def _log(msg: str) -> None:
    if mesh_lib.is_main_process():
        tqdm.write(msg)


def _host(tree):
    """A pytree of (possibly multi-process sharded) arrays as numpy on every process. A collective when some leaf is
    not fully addressable (FSDP over processes): call it on every process."""
    leaves = jax.tree_util.tree_leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False) for x in leaves):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _set_aside_newer(checkpointer: ckpt_lib.Checkpointer, restored: int,
                     cfg: Config) -> tuple[ckpt_lib.Checkpointer, dict]:
    """After a fallback to `restored`, rename the damaged newer step directories to `<step>.corrupt-<time>` (kept
    for inspection, invisible to step listing) so that those steps are written afresh; returns a reopened
    checkpointer and {step: new path} (process 0; empty elsewhere). Without this the manager still lists the
    damaged step and skips saving it again."""
    newer = [s for s in checkpointer.all_steps() if s > restored]
    moved = {}
    if not newer:
        return checkpointer, moved
    if mesh_lib.is_main_process():
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for s in newer:
            src = checkpointer.step_dir(s)
            dst = src.with_name(f"{s}.corrupt-{stamp}")
            os.replace(src, dst)
            moved[s] = dst
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dwjax-set-aside-corrupt-checkpoints")
    directory = checkpointer.directory
    checkpointer.close()
    return ckpt_lib.Checkpointer(directory, cfg), moved


def _fallback_lines(skipped: list[tuple[int, str]], moved: dict, start_step: int) -> list[str]:
    """One line per damaged step a resume skipped: which, why, where it went and the step used instead."""
    reasons = dict(skipped)
    lines = []
    for s in sorted(set(reasons) | set(moved), reverse=True):
        why = reasons.get(s, "newer than the restored step")
        where = f"; set aside as {moved[s].name}" if s in moved else ""
        lines.append(f"checkpoint step {s} skipped: {why}{where}; resuming from step {start_step} instead")
    return lines


def _load(role: str, source: str) -> LoadedModel:
    """`load_model` for model.teacher / model.student: its UserErrors (WeightsError: a missing, truncated or
    altered file) pass through as they are; anything else a broken file can raise becomes one WeightsError."""
    try:
        return load_model(source)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, EOFError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise WeightsError(f"model.{role}={source} cannot be loaded: {type(e).__name__}: {detail}") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (not an OSError)
        if type(e).__name__ != "SafetensorError":
            raise
        detail = " ".join(str(e).split())[:200]
        raise WeightsError(f"model.{role}={source}: a weight file is damaged or truncated ({detail})") from None


class _TrainLog:
    """The hook that logs training metrics (every `train.log_every` steps, the run's first and last step): loss, KL,
    CE, step time, samples/s, tokens/s, speech-s/s and MFU over the steps since the last log; it sees every step
    to count their FLOPs (by each batch's padded label length) and speech seconds."""

    def __init__(self, cfg: Config, logs: MetricsWriter, progress: Progress, summary: dict, flops_of, peak: float,
                 global_batch: int, n_proc: int, start_step: int):
        self.cfg, self.logs, self.progress, self.summary = cfg, logs, progress, summary
        self.flops_of, self.peak, self.global_batch, self.n_proc = flops_of, peak, global_batch, n_proc
        self.start_step = start_step
        self.lengths: set[int] = set()
        self.shapes: set[tuple[int, int]] = set()
        self.t_last, self.n_steps, self.flops, self.speech = time.time(), 0, 0.0, 0.0

    def __call__(self, info: StepInfo) -> None:
        n_pos = int(info.local["labels"].shape[1])
        if n_pos not in self.lengths:
            self.lengths.add(n_pos)
            self.summary["label_lengths"] = sorted(self.lengths)
        targets = info.local.get("target_positions")
        n_targets = n_pos if targets is None else int(targets.shape[1])
        if (n_pos, n_targets) not in self.shapes:
            self.shapes.add((n_pos, n_targets))
            self.summary["step_shapes"] = [list(x) for x in sorted(self.shapes)]
        self.flops += self.flops_of(n_pos, n_targets)
        self.speech += float(info.local["audio_seconds"]) * self.n_proc
        self.n_steps += 1
        if not (info.step % self.cfg.train.log_every == 0 or info.final or info.step == self.start_step + 1):
            return
        m = {k: float(v) for k, v in jax.device_get(info.metrics).items()}
        dt = (time.time() - self.t_last) / self.n_steps
        m.update(step_time_s=dt, samples_per_s=self.global_batch / dt, tokens_per_s=m["n_tokens"] / dt,
                 mfu=self.flops / self.n_steps / dt / self.peak, speech_s_per_s=self.speech / self.n_steps / dt,
                 label_length=n_pos)
        self.logs.write(info.step, m, prefix="train/")
        self.progress.show(loss=f"{m['loss']:.3f}", kl=f"{m['kl']:.3f}", ce=f"{m['ce']:.3f}", step_s=f"{dt:.2f}",
                           tok_s=f"{m['tokens_per_s']:.0f}", mfu=f"{m['mfu']:.1%}")
        self.summary.setdefault("first_loss", m["loss"])
        self.summary["last_loss"] = m["loss"]
        self.t_last, self.n_steps, self.flops, self.speech = time.time(), 0, 0.0, 0.0


#: per-step ids of the examples each process trained on, in the log directory (one JSON line per step)
BATCH_LOG = "batches.jsonl"


def batch_log_name(process_index: int) -> str:
    """`batches.jsonl` for process 0, `batches.process<i>.jsonl` for the others (global batch = concatenation)."""
    return BATCH_LOG if process_index == 0 else f"batches.process{process_index}.jsonl"


def run(cfg: Config, *, devices=None) -> dict:
    """The distillation run (module docstring). `devices`: run on these (local) devices instead of all of them
    (single-process only; tests use it to change the device count between a run and its resumption)."""
    mesh_lib.initialize_distributed()
    if devices is not None:
        devices = list(devices)
        if jax.process_count() > 1:
            raise UserError("run(devices=...) is for single-process runs")
    n_dev, n_proc = (len(devices) if devices is not None else jax.device_count()), jax.process_count()
    shape = mesh_lib.validate_for_devices(cfg, n_dev, n_proc)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    ckpt_lib.reset_stop()          # a stop requested in an earlier run of this process does not carry over
    out_dir = cfg.run.output_dir
    if not cfg.data.train:
        raise UserError("no training data: set data.train (a list of {name, path, weight}) to pseudo-label outputs")
    if not cfg.model.student:
        raise UserError("model.student is not set: run `dwjax init-student --teacher T --decoder-layers 2 "
                        "--output DIR` and pass model.student=DIR")

    # data first (cheap, and the commonest mistake), after the label filters (counts reported per set)
    sets, counts, rules = [], {}, {}
    for ds in cfg.data.train:
        rules[ds.name] = LabelFilter.for_set(cfg.data, ds)
        s, c = read_labelled(ds.name, ds.path, rules[ds.name], ds.weight, cfg.data.max_label_length,
                             language=ds.language, task=ds.task)
        sets.append(s)
        counts[ds.name] = c

    teacher = _load("teacher", cfg.model.teacher)
    student = _load("student", cfg.model.student)
    tok = teacher.tokenizer
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise UserError(f"student vocabulary ({student.cfg.vocab_size}) differs from the teacher's "
                        f"({teacher.cfg.vocab_size}): make the student from this teacher")
    run_on = {}
    for s_ in sets:
        s_.set_tokenizer(tok)
        run_on[s_.name] = run_on_windows(s_, cfg.data.run_on_fraction, cfg.data.seed, tok, cfg.data.max_label_length)
    length = label_length(sets, cfg.data.max_label_length, prev_context_probability=cfg.data.prev_context_probability)
    accum = cfg.train.grad_accum_steps
    global_batch = mesh_lib.global_batch_size(cfg, n_dev) * accum      # examples per optimizer step

    steps = make_sharded_train_step(cfg, mesh, student.cfg, teacher.cfg)   # checks the model fits the mesh
    if cfg.train.encoder_cache and not shares_encoder(student.cfg, teacher.cfg):
        raise UserError("train.encoder_cache caches the teacher's encoder, but this student has an encoder of its "
                        "own shape (it would still need the audio): make the student with `dwjax init-student` "
                        "(it keeps the teacher's encoder) or set train.encoder_cache=null")
    cache = None
    if cfg.train.encoder_cache:
        n_syncs = [0]

        def sync():
            if jax.process_count() > 1:
                n_syncs[0] += 1
                multihost_utils.sync_global_devices(f"dwjax-encoder-cache-open-{n_syncs[0]}")
        cache = open_cache(cfg.train.encoder_cache, sets,
                           teacher_fingerprint(teacher.params["encoder"], teacher.cfg.n_mels, cfg.model.dtype),
                           cfg.train.encoder_cache_dtype, teacher.cfg.n_audio_ctx, teacher.cfg.d_model,
                           rebuild=cfg.train.encoder_cache_rebuild, main_process=mesh_lib.is_main_process(),
                           sync=sync, log=_log)

    # everything that can be refused has been checked: now say what the run is
    for name, c in counts.items():
        _log(format_counts(name, c, rules[name]))
        c["run_on"] = run_on[name]
        if run_on[name]:
            _log(f"{name}: {run_on[name]} packed window(s) run on into the next one up to 30 s "
                 f"(data.run_on_fraction {cfg.data.run_on_fraction:g})")
    if devices is None:
        mesh_lib.banner(cfg, global_batch)       # global_batch already includes the accumulation
        _log(f"labels padded to {_padding_words(length, cfg.data.label_bucket)}")
    else:
        _log(f"labels padded to {_padding_words(length, cfg.data.label_bucket)}; global batch {global_batch} "
             f"({cfg.train.per_device_batch_size}/device x {n_dev} devices x {accum} accumulation); mesh {shape}")
    encoder = LabelEncoder(tok, length, cfg.data.timestamp_probability,
                           prev_context_probability=cfg.data.prev_context_probability)
    batches = TrainBatches(sets, encoder, global_batch, cfg.data.seed, jax.process_index(), n_proc,
                           cfg.data.num_workers, label_bucket=cfg.data.label_bucket, encoder_cache=cache)
    teacher_params = steps.shard_teacher(teacher.params)
    if cache is not None:
        fill_encoder_cache(cache, steps, teacher_params, teacher.cfg.n_mels, cfg,
                           mesh_lib.global_batch_size(cfg, n_dev), cfg.data.num_workers)

    # where to start (documented order in dwjax/checkpoint/__init__.py)
    os.makedirs(out_dir, exist_ok=True) if mesh_lib.is_main_process() else None
    start = ckpt_lib.resolve_start(out_dir, cfg)
    checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(out_dir), cfg)
    abstract = steps.abstract_state()
    if start.kind == "resume":
        state, position, meta = checkpointer.restore_latest_valid(abstract)
        skipped = list(checkpointer.skipped)
        start_step = int(position.get("step", int(state.step)))
        checkpointer, moved = _set_aside_newer(checkpointer, start_step, cfg)
        lines = _fallback_lines(skipped, moved, start_step)
        for line in lines:
            _log(line)
        for key, now in (("seed", cfg.data.seed), ("global_batch", global_batch)):
            if key in position and position[key] != now:
                _log(f"warning: the checkpoint's data position has {key} {position[key]} but this run has {now}: "
                     f"the data stream is not the one the interrupted run would have seen")
        if not lines:
            _log(f"resuming from {checkpointer.directory} at step {start_step}")
    elif start.kind == "init_from":
        src = ckpt_lib.Checkpointer(start.path, cfg, read_only=True)
        restored, _, _ = src.restore(start.step, abstract)
        state = steps.init_state(jax.device_get(restored.params), jax.random.PRNGKey(cfg.run.seed))
        start_step = 0
        _log(f"initialised from checkpoint {start.path} step {start.step}")
    else:
        state = steps.init_state(student.params, jax.random.PRNGKey(cfg.run.seed))
        start_step = 0
        _log(f"starting from {cfg.model.student}")
    if mesh_lib.is_main_process():
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))

    logs = MetricsWriter(cfg.logging.output_dir or os.path.join(out_dir, "logs"), cfg.logging.jsonl,
                         cfg.logging.tensorboard, cfg.logging.wandb, cfg.run.name, to_dict(cfg))
    logs.write(start_step, {f"data/{n}/{k}": v for n, c in counts.items() for k, v in c.items()})
    features = Features(teacher.cfg.n_mels, steps.batch_sharding)
    log_dir = cfg.logging.output_dir or os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    batch_log = open(os.path.join(log_dir, batch_log_name(jax.process_index())), "a", buffering=1)
    restore_signals = ckpt_lib.install_preemption_handler()
    total = cfg.optim.total_steps
    def flops_of(n_positions: int, n_targets: int | None) -> float:
        """Analytic FLOPs of a step whose labels are padded to n_positions, logits at n_targets of them (no
        encoder with the cache)."""
        return train_step_flops(teacher.cfg, student.cfg, global_batch, n_positions, with_encoder=cache is None,
                                frozen=tuple(cfg.optim.frozen), targets=n_targets)[1]
    peak = peak_flops(devices)

    eval_sets = load_eval_sets(cfg.data.eval, cfg.eval.max_samples)     # read once for the whole run
    teacher_forced = TeacherForced(eval_sets, tok, teacher.cfg.n_mels, cfg.eval.batch_size * n_dev, steps,
                                   cfg.data.max_label_length, jax.process_index(), n_proc)
    greedy_wer = GreedyWer(eval_sets, {"student": student, "teacher": teacher}, mesh,
                           cfg.eval.batch_size * n_dev, cfg.model.kernels)

    def evaluate(state, step: int, with_teacher: bool) -> dict:
        """WER of greedy generation (the student, and the teacher when asked) and the teacher-forced KL at T = 1
        and CE on every evaluation set (dwjax/training_eval.py)."""
        if not cfg.data.eval:
            return {}
        results = teacher_forced(state.params, teacher_params)
        results.update(greedy_wer({"student": state.params} | ({"teacher": teacher_params} if with_teacher else {})))
        logs.write(step, results, prefix="eval/")
        _log("eval step %d: %s" % (step, ", ".join(f"{k} {v:.2f}" for k, v in results.items())))
        return results

    summary = {"start_step": start_step, "data": counts, "label_lengths": []}
    bar = tqdm(total=total, initial=start_step, desc="distill", unit="step", disable=not mesh_lib.is_main_process(),
               dynamic_ncols=True)
    progress = Progress(bar, global_batch, audio_scale=n_proc)

    def to_device(local: dict) -> dict:
        batch = {k: jax.make_array_from_process_local_data(steps.batch_sharding, np.asarray(local[k]))
                 for k in ("decoder_input_ids", "labels", "loss_mask", "target_positions") if k in local}
        if "encoder_out" in local:
            batch["encoder_out"] = jax.make_array_from_process_local_data(steps.batch_sharding, local["encoder_out"])
        else:
            batch["input_features"] = features(local["audio"])
        return batch

    trainer = Trainer(lambda st, batch: steps.train_step(st, teacher_params, batch), total, progress,
                      ckpt_lib.should_stop)
    trainer.add_hook(lambda info: batch_log.write(json.dumps({"step": info.step, "ids": list(info.local["ids"])})
                                                  + "\n"))
    trainer.add_hook(_TrainLog(cfg, logs, progress, summary, flops_of, peak, global_batch, n_proc, start_step))
    last_eval: dict = {}
    if cfg.data.eval:
        def eval_hook(info: StepInfo) -> None:
            nonlocal last_eval
            info.results["eval"] = last_eval = evaluate(info.state, info.step,
                                                        with_teacher=not last_eval or info.final)
        trainer.add_hook(eval_hook, every=cfg.eval.every)

    def checkpoint_hook(info: StepInfo) -> None:
        # only a step evaluated now carries a WER (a later step must not inherit an earlier step's rank)
        evaluated = info.results.get("eval")
        checkpointer.save(info.step, info.state, {"step": info.step, "seed": cfg.data.seed,
                                                  "global_batch": global_batch},
                          metrics={"wer": mean_student_wer(evaluated)} if evaluated else None,
                          force=info.stop or info.final)
        if info.stop:
            _log(f"stop requested (SIGTERM): checkpoint at step {info.step} written; exiting")
            summary["preempted_at"] = info.step
    trainer.add_hook(checkpoint_hook, every=1, on_stop=True)

    try:
        state, last = trainer.run(state, batches.prefetch(start_step), start_step, to_device)
    finally:
        checkpointer.wait_until_finished()
        restore_signals()
        bar.close()
        batch_log.close()
        batches.close()
    step = last.step if last is not None else start_step

    if step >= total:
        summary["eval"] = last_eval if start_step < total else evaluate(state, step, with_teacher=True)
        final_params = _host(state.params)            # every process (a collective under multi-process FSDP)
        if mesh_lib.is_main_process():
            final_dir = os.path.join(out_dir, "student")
            meta = dict(student.metadata, distilled_steps=step, teacher=cfg.model.teacher)
            save_dwjax(final_dir, student.cfg, final_params, student.tokenizer,
                       student.generation, meta)
            _log(f"student written to {final_dir}")
    summary["end_step"] = step
    if mesh_lib.is_main_process():
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    checkpointer.close()
    logs.close()
    return summary


def _padding_words(length: int, bucket: int) -> str:
    if bucket <= 0:
        return f"{length} tokens"
    return f"each batch's longest label rounded up to a multiple of {bucket} (at most {length} tokens)"


def fill_encoder_cache(cache, steps, teacher_params, n_mels: int, cfg: Config, global_batch: int,
                       workers: int) -> int:
    """Computes the cache's missing rows on the mesh (each process its rows of each global batch of
    `global_batch` rows) and writes them (dwjax/data/encoder_cache.py)."""
    features = Features(n_mels, steps.batch_sharding)
    dtype = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}[cfg.train.encoder_cache_dtype]

    def load(di):
        a, _ = row_audio(cache.sets[di[0]], di[1])
        out = np.zeros(N_SAMPLES, np.float32)
        n = min(len(a), N_SAMPLES)
        out[:n] = a[:n]
        return out

    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        def load_batch(rows):              # runs in the cache's read-ahead thread while the last batch encodes
            return np.stack(list(pool.map(load, rows)))

        def compute(audio):
            enc = steps.encode(teacher_params, features(audio), dtype)
            return _local_rows(enc).astype(numpy_dtype(cfg.train.encoder_cache_dtype))
        return cache.fill(compute, global_batch, jax.process_index(), jax.process_count(), log=_log,
                          progress=mesh_lib.is_main_process(), load=load_batch)


def _local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (replicas across other axes dropped)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    shards = {}
    for sh in x.addressable_shards:
        start = sh.index[0].start or 0
        shards.setdefault(start, sh)
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])
