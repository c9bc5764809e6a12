"""The teacher (`Teacher`): the inference engine (`dwjax.decoding.transcribe.Transcriber`) on the run's mesh, its
fused batch-sharded step for the labelling runs, each row's language and task; beam search and long-form through
the same engine (`Teacher.local_transcriber`)."""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from dwjax.audio import N_SAMPLES
from dwjax.data.manifest import Example
from dwjax.decoding.longform import transcribe_long
from dwjax.decoding.transcribe import Transcriber
from dwjax.errors import ConfigError, UserError
from dwjax.pseudo_label.options import LabelOptions
from dwjax.pseudo_label.rows import _base_row, _Loaded, _transcript_row, runaway_limit
from dwjax.text.languages import check_language, script_problem
from dwjax.text.languages import LANGUAGES, resolve_language
from dwjax.weights.loading import load_model


class Teacher:
    """The teacher's engine on a mesh (replicated parameters, rows split over the devices, each device decoding its
    own rows: no collective, so a device never waits for another's longest row and a row's result does not depend
    on which device holds it) and the run's prompt, languages and tasks."""

    def __init__(self, opts: LabelOptions, mesh: Mesh):
        self.opts, self.mesh = opts, mesh
        self.loaded = load_model(opts.teacher)
        self.cfg, self.tok = self.loaded.cfg, self.loaded.tokenizer
        self.multilingual = self.tok.is_multilingual
        if not self.multilingual and opts.task == "translate":
            raise UserError("an English-only teacher cannot translate; use a multilingual model")
        self.transcriber = Transcriber(self.loaded, dtype=opts.dtype, batch_size=max(1, opts.batch_size) * mesh.size,
                                       scan_layers=opts.scan_layers, mesh=mesh)
        self.engine = self.transcriber.generator
        self.spec = dataclasses.replace(self.transcriber.spec, timestamps=bool(opts.timestamps))
        self.forced_language = None
        if opts.language:       # the run's option: a bad one refuses the run (one line)
            code = check_language(opts.language, self.tok, f"the teacher {opts.teacher}")
            if self.multilingual:
                self.forced_language = self.tok.language_token(code)
        # the prompt; multilingual: a language placeholder at position 1, filled per row inside the step
        if self.multilingual:
            self.template = self.tok.sot_sequence(next(iter(self.tok.languages)), opts.task, opts.timestamps)
        else:
            self.template = self.tok.sot_sequence(None, None, opts.timestamps)
        self.language_ids = tuple(self.tok.languages.values()) if self.multilingual else None
        self.code_of = {i: c for c, i in self.tok.languages.items()} if self.multilingual else {}
        self.max_new = min(opts.max_new_tokens, self.cfg.n_text_ctx - len(self.template))
        self.batch_sharding = self.engine.rows
        self._local: Optional[Transcriber] = None

    def local_transcriber(self) -> Transcriber:
        """The engine for the rows this process decodes on its own (beam search, long-form): the mesh's when this
        process holds all its devices, else one over this process's devices (built once, its own copy of the
        weights)."""
        if self.mesh.is_multi_process:
            if self._local is None:
                local = Mesh(np.array(jax.local_devices()).reshape(-1, 1), ("data", "fsdp"))
                self._local = Transcriber(self.loaded, dtype=self.opts.dtype,
                                          batch_size=max(1, self.opts.batch_size) * local.size,
                                          scan_layers=self.opts.scan_layers, mesh=local)
            return self._local
        return self.transcriber

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
        try:
            code = check_language(e.language, self.tok, f"the teacher {self.opts.teacher}")
        except ConfigError as err:
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
        out = self.engine.label(self.engine.features(audio), lang, task, active, limit, spec=self.spec,
                                template=self.template, language_ids=self.language_ids, max_new=self.max_new)
        return {k: _local_rows(v, local_audio.shape[0]) for k, v in out.items()}


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


def _decode_kw(opts: LabelOptions, language: Optional[str], task: Optional[str] = None) -> dict:
    kw = dict(language=language, task=task or opts.task, timestamps=opts.timestamps,
              max_new_tokens=opts.max_new_tokens)
    if opts.num_beams > 1:
        kw["num_beams"] = opts.num_beams
    return kw


def _long_row(teacher: "Teacher", opts: LabelOptions, item: _Loaded) -> dict:
    """The row of a clip over 30 s: its long-form decoding, or the reason that failed."""
    tr = teacher.local_transcriber()
    e = item.example
    lid = teacher.language_id(e)
    language = teacher.code_of.get(lid) if isinstance(lid, int) and lid >= 0 else None
    try:
        t = transcribe_long(tr, item.audio, **_decode_kw(opts, language, teacher.task(e)))
        return _transcript_row(e, item.duration, t, opts.timestamps, teacher.task(e), teacher.language_source(e))
    except Exception as err:  # a row must never stop the run
        return _base_row(item.example, item.duration, f"long-form decoding failed: {type(err).__name__}: {err}")
