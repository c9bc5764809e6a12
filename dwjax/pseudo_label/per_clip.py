"""The per-clip labelling run: each clip its own 30 s window, this process's rows of every global batch decoded on
the mesh (beam search and long-form through `Teacher.local_transcriber`) and written to part files."""
from __future__ import annotations

import concurrent.futures as cf
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from dwjax.audio import N_SAMPLES
from dwjax.data.label_store import next_part_index, write_part
from dwjax.data.manifest import Example
from dwjax.mesh import is_main_process
from dwjax.pseudo_label.options import LabelOptions
from dwjax.pseudo_label.rows import (_base_row, _label_row, _load, _report_failure, _transcript_row, is_failure,
                                     ran_away, runaway_row)
from dwjax.pseudo_label.teacher import Teacher, _decode_kw, _long_row


def _run_per_clip(pending: list[Example], opts: LabelOptions, teacher: "Teacher", output: Path, proc: int,
                  n_proc: int, lo: int, hi: int, global_b: int, n_examples: int, n_done: int, n_dev: int) -> dict:
    """Each clip its own 30 s window: this process's rows of every global batch, decoded and written."""
    n_local = hi - lo
    n_batches = math.ceil(len(pending) / global_b)
    if is_main_process():
        print(f"dwjax pseudo-label: teacher {opts.teacher}; {n_examples} examples, {n_done} already labelled, "
              f"{len(pending)} to label in {n_batches} global batches of {global_b} "
              f"({opts.batch_size} per device x {n_dev} devices, {n_local} rows per process x {n_proc} processes)",
              flush=True)

    part_index = next_part_index(output, proc, n_proc)
    buffer: list[dict] = []
    local_audio_s, local_rows, local_ok, local_failed = 0.0, 0, 0, 0
    bar = None
    if is_main_process() and opts.progress and n_batches:
        bar = tqdm(total=len(pending), unit="utt", dynamic_ncols=True, file=sys.stderr, desc="pseudo-label")
    t0 = time.time()

    def rows_of(g: int) -> list[Example]:
        start = g * global_b
        return pending[start + lo: min(start + hi, len(pending))]

    with cf.ThreadPoolExecutor(max_workers=max(1, opts.num_workers)) as pool:
        def submit(g: int):
            return [pool.submit(_load, e) for e in rows_of(g)] if g < n_batches else []

        ahead = submit(0)
        for g in range(n_batches):
            current, ahead = ahead, submit(g + 1)        # decode the next batch's audio while the device works
            loaded = [f.result() for f in current]
            audio = np.zeros((n_local, N_SAMPLES), np.float32)
            lang = np.full((n_local,), -1, np.int32)
            task = np.full((n_local,), -1, np.int32)
            on_device = []
            for i, item in enumerate(loaded):
                if item.status in ("ok", "long"):
                    lid = teacher.check(item.example)
                    if isinstance(lid, str):
                        item.status = lid
                        continue
                if item.status == "ok":
                    lang[i] = lid
                    task[i] = teacher.task_id(item.example)
                    audio[i, : len(item.audio)] = item.audio
                    on_device.append(i)
            rows: list[Optional[dict]] = [None] * len(loaded)
            if opts.num_beams > 1:
                # beam search: each row on its own, through the engine of this process's devices
                tr = teacher.local_transcriber()
                for i in on_device:
                    item = loaded[i]
                    language = teacher.code_of.get(int(lang[i])) if lang[i] >= 0 else None
                    e = item.example
                    t = tr.transcribe_batch([item.audio], **_decode_kw(opts, language, teacher.task(e)))[0]
                    rows[i] = _transcript_row(e, item.duration, t, opts.timestamps, teacher.task(e),
                                              teacher.language_source(e))
            elif on_device or n_proc > 1:
                limit = teacher.limits([item.duration for item in loaded], n_local)
                out = teacher.run(audio, lang, global_b, task, local_limit=limit)
                for i in on_device:
                    item = loaded[i]
                    e = item.example
                    ids = out["tokens"][i, : out["lengths"][i]].tolist()
                    text = teacher.tok.decode(ids).strip()
                    segs = teacher.tok.segments(ids, duration=item.duration) if opts.timestamps else None
                    language = teacher.code_of.get(int(out["language"][i]), "en") if teacher.multilingual else "en"
                    avg_lp = float(out["sum_logprob"][i]) / (int(out["lengths"][i]) + 1)
                    prob = float(out["language_probability"][i]) if teacher.multilingual else None
                    rows[i] = _label_row(e, item.duration, text, ids, language, avg_lp,
                                         float(out["no_speech_prob"][i]), segs, teacher.task(e), prob,
                                         teacher.language_source(e))
                    if ran_away(teacher, ids, limit[i]):
                        rows[i] = runaway_row(rows[i], len(ids), item.duration)
            for i, item in enumerate(loaded):
                if rows[i] is not None:
                    continue
                if item.status == "long":
                    rows[i] = _long_row(teacher, opts, item)
                else:
                    rows[i] = _base_row(item.example, item.duration, item.status)
            for r in rows:
                local_rows += 1
                if r["status"] == "ok":
                    local_ok += 1
                    local_audio_s += r["duration_s"] or 0.0
                elif is_failure(r["status"]):
                    local_failed += 1
                    _report_failure(r, bar)
            buffer.extend(rows)
            if buffer and ((g + 1) % opts.commit_every == 0 or g + 1 == n_batches):
                write_part(output, proc, n_proc, part_index, buffer)
                part_index += 1
                buffer = []
            if bar is not None:   # process 0's audio, scaled to all processes (no communication)
                bar.update(min(global_b, len(pending) - g * global_b))
                audio_s = local_audio_s * n_proc
                bar.set_postfix_str(f"~{audio_s / 3600:.3f} h audio, ~{audio_s / max(time.time() - t0, 1e-9):.2f} "
                                    "audio-s/s", refresh=False)
    if bar is not None:
        bar.close()
    return {"audio_s": local_audio_s, "rows": local_rows, "ok": local_ok, "failed": local_failed,
            "wall": time.time() - t0}
