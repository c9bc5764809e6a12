"""The teacher on a mesh (`Teacher`): replicated parameters, one jitted batch-sharded step (`label_step`), each row's
language and task; and on the local device (a `Transcriber` sharing its weights) for beam search and long-form."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import numpy as np

from dwjax.audio import N_SAMPLES
from dwjax.data.manifest import Example
from dwjax.decoding.longform import transcribe_long
from dwjax.errors import ConfigError, UserError
from dwjax.pseudo_label.options import LabelOptions
from dwjax.pseudo_label.rows import _base_row, _Loaded, _transcript_row, runaway_limit


class Teacher:
    """The teacher on a mesh: replicated parameters and one jitted, batch-sharded log-mel + encode + generate."""

    def __init__(self, opts: LabelOptions, mesh):
        import dataclasses as dc

        import jax
        import jax.numpy as jnp

        from dwjax.decoding.rules import DecodeSpec
        from dwjax.decoding.transcribe import DTYPES
        from dwjax.mesh import data_sharding, replicated
        from dwjax.models.whisper import Whisper
        from dwjax.weights.loading import load_model

        if opts.dtype not in DTYPES:
            raise UserError(f"unknown dtype {opts.dtype!r}; use float32 or bfloat16")
        self.opts, self.mesh = opts, mesh
        self.loaded = load_model(opts.teacher)
        self.cfg, self.tok = self.loaded.cfg, self.loaded.tokenizer
        self.multilingual = self.tok.is_multilingual
        if not self.multilingual and opts.task == "translate":
            raise UserError("an English-only teacher cannot translate; use a multilingual model")
        self.model = Whisper(self.cfg, dtype=DTYPES[opts.dtype], scan_layers=opts.scan_layers)
        self.spec = dc.replace(DecodeSpec.for_model(self.tok, self.loaded.generation, self.cfg.vocab_size),
                               timestamps=bool(opts.timestamps))
        self.forced_language = None
        if opts.language:       # the run's option: a bad one refuses the run (one line)
            from dwjax.text.languages import check_language
            code = check_language(opts.language, self.tok, f"the teacher {opts.teacher}")
            if self.multilingual:
                self.forced_language = self.tok.language_token(code)
        # the prompt; multilingual: a language placeholder at position 1, filled per row inside the step
        if self.multilingual:
            self.template = self.tok.sot_sequence(next(iter(self.tok.languages)), opts.task, opts.timestamps)
        else:
            self.template = self.tok.sot_sequence(None, None, opts.timestamps)
        self.code_of = {i: c for c, i in self.tok.languages.items()} if self.multilingual else {}
        self.max_new = min(opts.max_new_tokens, self.cfg.n_text_ctx - len(self.template))
        self.batch_sharding = data_sharding(mesh)
        self.replicated = replicated(mesh)
        self.params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, self.loaded.params), self.replicated)
        # each device decodes its own rows with its own while loop (shard_map): no collective at all, so a device
        # never waits for another's longest row, and a row's result does not depend on which device holds it
        from jax.sharding import PartitionSpec as P

        from dwjax.mesh import BATCH_AXES
        rows = P(BATCH_AXES)
        step = jax.shard_map(self._step_impl, mesh=mesh, in_specs=(P(), rows, rows, rows, rows, rows),
                             out_specs=rows, check_vma=False)
        self._step = jax.jit(step, in_shardings=(self.replicated,) + (self.batch_sharding,) * 5,
                             out_shardings=self.batch_sharding)
        self._mel = jax.jit(self._mel_impl, in_shardings=self.batch_sharding, out_shardings=self.batch_sharding)

    def _mel_impl(self, audio):
        from dwjax.audio import log_mel_spectrogram
        return log_mel_spectrogram(audio, n_mels=self.cfg.n_mels)

    def _step_impl(self, params, mel, lang, task, active, limit):
        lang_ids = tuple(self.tok.languages.values()) if self.multilingual else None
        return label_step(self.model, self.spec, self.template, lang_ids, self.max_new, params, mel, lang,
                          task if self.multilingual else None, active, limit)

    def limits(self, durations: Sequence[Optional[float]], n_local: int) -> np.ndarray:
        """(n_local,) int32: each row's runaway limit (`runaway_limit`); padding rows get the budget."""
        out = np.full((n_local,), self.max_new, np.int32)
        out[: len(durations)] = [runaway_limit(d, self.max_new) for d in durations]
        return out

    def language_id(self, e: Example) -> int | str:
        """The forced language token of a row (-1: detect), or a failure status when the row's language cannot
        be used: "unknown language: ..." or "unsupported language: ..." (see the package docstring)."""
        if self.forced_language is not None:
            return self.forced_language
        if not e.language:
            return -1
        from dwjax.text.languages import check_language
        try:
            code = check_language(e.language, self.tok, f"the teacher {self.opts.teacher}")
        except ConfigError as err:
            from dwjax.text.languages import LANGUAGES, resolve_language
            try:
                known = resolve_language(e.language) in LANGUAGES
            except ConfigError:
                known = False
            return f"{'unsupported' if known else 'unknown'} language: {err}"
        return self.tok.language_token(code) if self.multilingual else -1

    def language_source(self, e: Example) -> str:
        return "forced" if self.forced_language is not None else ("manifest" if e.language else "detected")

    def task(self, e: Example) -> str:
        return e.task or self.opts.task

    def task_id(self, e: Example) -> int:
        """The task token of a row (multilingual teachers; -1 for English-only ones, which have no task)."""
        if not self.multilingual:
            return -1
        return self.tok.translate if self.task(e) == "translate" else self.tok.transcribe

    def check(self, e: Example) -> int | str:
        """`language_id`, or the "mixed scripts: ..." status of a row whose reference is not written in the
        script of its language (the forced or manifest one; a translation's reference is English)."""
        lid = self.language_id(e)
        if isinstance(lid, str) or e.text is None:
            return lid
        from dwjax.text.languages import script_problem
        language = "en" if self.task(e) == "translate" else (self.opts.language or e.language)
        problem = script_problem(e.text, language)
        return problem if problem is not None else lid

    def run(self, local_audio: np.ndarray, local_lang: np.ndarray, global_b: int,
            local_task: Optional[np.ndarray] = None, local_active: Optional[np.ndarray] = None,
            local_limit: Optional[np.ndarray] = None):
        """Global arrays from this process's rows, one step, this process's rows of the results (numpy).
        `local_task`: each row's task token (default: the run's task). `local_active`: False for padding rows
        (not encoded, decoded as done: their results are meaningless); default all True. `local_limit`: each
        row's most generated tokens (`limits`, the runaway stop); default the budget."""
        import jax
        s = self.batch_sharding
        if local_task is None:
            local_task = np.full(local_lang.shape, self.template[2] if self.multilingual else -1, np.int32)
        audio = jax.make_array_from_process_local_data(s, local_audio, (global_b, N_SAMPLES))
        lang = jax.make_array_from_process_local_data(s, local_lang, (global_b,))
        task = jax.make_array_from_process_local_data(s, local_task, (global_b,))
        if local_active is None:
            local_active = np.ones(local_lang.shape, bool)
        active = jax.make_array_from_process_local_data(s, np.asarray(local_active, bool), (global_b,))
        if local_limit is None:
            local_limit = np.full(local_lang.shape, self.max_new, np.int32)
        limit = jax.make_array_from_process_local_data(s, np.asarray(local_limit, np.int32), (global_b,))
        out = self._step(self.params, self._mel(audio), lang, task, active, limit)
        return {k: _local_rows(v, local_audio.shape[0]) for k, v in out.items()}


def label_step(model, spec, template, language_ids, max_new: int, params, mel, lang, task=None, active=None,
               limit=None):
    """One device's rows: encoder, language detection (multilingual teachers, rows with lang < 0), greedy decode.

    `template` is the prompt; for multilingual teachers position 1 holds the language token, filled per row from
    `lang` (>= 0: forced) or the detected language, and position 2 the task token, per row from `task` when
    given. Outputs also `language` (the token used) and `language_probability` (the teacher's probability of it
    among the language tokens). Pure: the pseudo-labeller runs it under shard_map; the accelerator benchmark
    times the same function. `active` (b,) bool: False for padding rows (not encoded, decoded as done). `limit`
    (b,) int: each row's most generated tokens (the runaway stop; default max_new)."""
    import jax
    import jax.numpy as jnp

    from dwjax.decoding.generate import decode_loop
    from dwjax.models.whisper import encode_batch
    b = mel.shape[0]
    enc = encode_batch(model, params, mel, active)
    prompt = jnp.broadcast_to(jnp.asarray(template, jnp.int32), (b, len(template)))
    if language_ids is not None:
        ids = jnp.asarray(language_ids, jnp.int32)
        logits, _ = model.apply({"params": params}, jnp.full((b, 1), spec.sot, jnp.int32), enc, None,
                                method="decode")
        scores = jnp.take(logits[:, 0], ids, axis=-1).astype(jnp.float32)
        detected = ids[jnp.argmax(scores, axis=-1)]
        lang = jnp.where(lang >= 0, lang, detected).astype(jnp.int32)
        probs = jax.nn.softmax(scores, axis=-1)
        lang_prob = jnp.sum(jnp.where(ids[None, :] == lang[:, None], probs, 0.0), axis=-1)
        prompt = prompt.at[:, 1].set(lang)
        if task is not None:
            prompt = prompt.at[:, 2].set(jnp.asarray(task, jnp.int32))
    out = decode_loop(model, spec, params, enc, prompt, max_new, 0.0, None, 0, active=active, limit=limit)
    out["language"] = lang
    if language_ids is not None:
        out["language_probability"] = lang_prob
    return out


def _local_rows(x, n_local: int) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global order, from its addressable shards."""
    shards = sorted(x.addressable_shards, key=lambda sh: sh.index[0].start or 0)
    lo = shards[0].index[0].start or 0
    out = np.empty((n_local,) + x.shape[1:], x.dtype)
    for sh in shards:
        start = (sh.index[0].start or 0) - lo
        data = np.asarray(sh.data)
        out[start: start + data.shape[0]] = data
    return out


def local_row_range(sharding, global_b: int) -> tuple[int, int]:
    """[lo, hi): the rows of a (global_b,) batch this process's devices hold (must be one contiguous block)."""
    idx = sorted({(sl[0].start or 0, global_b if sl[0].stop is None else sl[0].stop)
                  for sl in sharding.addressable_devices_indices_map((global_b,)).values()})
    lo, hi = idx[0][0], idx[0][1]
    for start, stop in idx[1:]:
        if start != hi:
            raise ConfigError("this process's devices do not hold one contiguous block of the batch; "
                              "the pseudo-labeller needs the mesh's devices ordered by process")
        hi = stop
    return lo, hi


def _check_languages(pending: list[Example], teacher: "Teacher", report: bool = True) -> None:
    """Refuses translate rows for an English-only teacher (one line, the whole run); names each (dataset,
    language) whose rows cannot be labelled, one line per pair on stderr (`report`), with how many rows it has
    (those rows get the failure status, `Teacher.language_id`; every other row is labelled)."""
    if not teacher.multilingual:
        translate = [e for e in pending if teacher.task(e) == "translate"]
        if translate:
            raise UserError(f"the teacher {teacher.opts.teacher} is English-only and cannot translate; "
                            f"{len(translate)} row(s) ask for task translate (first: {translate[0].dataset}/"
                            f"{translate[0].id}): use a multilingual teacher such as builtin:whisper-base")
    bad: dict[tuple[str, str], list] = {}
    for e in pending:
        if e.language and teacher.forced_language is None:
            key = (e.dataset, e.language)
            if key not in bad:
                bad[key] = [teacher.language_id(e), 0]
            bad[key][1] += 1
    for (dataset, language), (status, n) in bad.items():
        if report and isinstance(status, str):
            print(f"dwjax pseudo-label: error: {dataset}: {n} row(s) of language {language!r} get no label: "
                  f"{status}", file=sys.stderr, flush=True)


def _local_transcriber(teacher: "Teacher", opts: LabelOptions, cache: dict):
    """A single-device Transcriber sharing the teacher's weights (long-form audio and beam search)."""
    if "transcriber" not in cache:
        from dwjax.decoding.transcribe import Transcriber
        cache["transcriber"] = Transcriber(teacher.loaded, dtype=opts.dtype, batch_size=max(1, opts.batch_size),
                                           scan_layers=opts.scan_layers)
    return cache["transcriber"]


def _decode_kw(opts: LabelOptions, language: Optional[str], task: Optional[str] = None) -> dict:
    kw = dict(language=language, task=task or opts.task, timestamps=opts.timestamps,
              max_new_tokens=opts.max_new_tokens)
    if opts.num_beams > 1:
        kw["num_beams"] = opts.num_beams
    return kw


def _long_row(teacher: "Teacher", opts: LabelOptions, item: _Loaded, cache: dict) -> dict:
    """The row of a clip over 30 s: its long-form decoding, or the reason that failed."""
    tr = _local_transcriber(teacher, opts, cache)
    e = item.example
    lid = teacher.language_id(e)
    language = teacher.code_of.get(lid) if isinstance(lid, int) and lid >= 0 else None
    try:
        t = transcribe_long(tr, item.audio, **_decode_kw(opts, language, teacher.task(e)))
        return _transcript_row(e, item.duration, t, opts.timestamps, teacher.task(e), teacher.language_source(e))
    except Exception as err:  # a row must never stop the run
        return _base_row(item.example, item.duration, f"long-form decoding failed: {type(err).__name__}: {err}")
