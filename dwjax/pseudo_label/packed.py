"""The packed labelling run (--pack): every pending clip probed, the good ones packed into windows
(dwjax.data.packing), the windows decoded on the mesh and split where a window reaches the token budget."""
from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from dwjax.audio import N_SAMPLES, SAMPLE_RATE
from dwjax.data.label_store import next_part_index, write_part
from dwjax.data.manifest import Example
from dwjax.data.packing import Utterance, members_json, pack, window_audio
from dwjax.errors import AudioError
from dwjax.mesh import is_main_process
from dwjax.pseudo_label.options import LabelOptions
from dwjax.pseudo_label.rows import (_base_row, _label_row, _load, _Loaded, _report_failure, _speech_seconds,
                                     is_failure, looped, ran_away, runaway_row)
from dwjax.pseudo_label.teacher import Teacher, _long_row

#: per-process counts summed over processes at the end of a run (the first four for every run, the rest --pack)
_TOTALS = ("audio_s", "rows", "ok", "failed", "windows", "packed_clips", "token_limit_splits",
           "token_limit_truncated")
#: token estimate of a packed member from its reference: ceil(factor x reference tokens) + per-member timestamps
_TOKEN_FACTOR, _TOKENS_PER_MEMBER, _TOKEN_MARGIN = 1.2, 4, 8
#: keep the probed audio in memory for the windows when all of it fits in this many bytes (else read it again)
_KEEP_AUDIO_BYTES = 1 << 30


def _probe(e: Example, keep: bool) -> _Loaded:
    item = _load(e)
    if not keep:
        item.audio = None if item.status == "ok" else item.audio
    return item


def _member_audio(e: Example, cached: Optional[np.ndarray]) -> np.ndarray:
    if cached is not None:
        return cached
    item = _load(e)
    if item.audio is None:
        raise AudioError(f"{e.dataset}/{e.id}: {item.status} (read again for its window)")
    return item.audio


def _run_packed(pending: list[Example], opts: LabelOptions, teacher: "Teacher", output: Path, proc: int,
                n_proc: int, lo: int, hi: int, global_b: int, n_examples: int, n_done: int, n_dev: int) -> dict:
    """--pack: probe every pending clip, pack the good ones into windows, label the windows (package docstring)."""
    t0 = time.time()
    n_local = hi - lo
    # 1. read every pending clip (all processes: every one must derive the same windows)
    keep = sum(os.path.getsize(e.audio_path) if e.audio_path and os.path.isfile(e.audio_path) else
               len(e.audio_bytes or b"") for e in pending) * 8 <= _KEEP_AUDIO_BYTES   # ~x8 decoded vs compressed
    with cf.ThreadPoolExecutor(max_workers=max(1, opts.num_workers)) as pool:
        probed = list(pool.map(lambda e: _probe(e, keep), pending))
    by_key = {(it.example.dataset, it.example.id): it for it in probed}
    own_rows: list[tuple[int, _Loaded, Optional[str]]] = []   # (index, item, failure) labelled on their own
    partitions: dict[tuple[str, int, str], list[Utterance]] = {}
    budget = teacher.max_new - _TOKEN_MARGIN
    for i, item in enumerate(probed):
        e = item.example
        if item.status not in ("ok", "long"):         # failed or no speech: a row of its own
            own_rows.append((i, item, None))
            continue
        lid = teacher.check(e)
        if isinstance(lid, str):
            own_rows.append((i, item, lid))
            continue
        if item.status == "long":                     # over 30 s: a row of its own (long-form)
            own_rows.append((i, item, None))
            continue
        ref = (e.text or "").strip()
        est = math.ceil(_TOKEN_FACTOR * len(teacher.tok.encode(" " + ref))) + _TOKENS_PER_MEMBER if ref else None
        partitions.setdefault((e.dataset, lid, teacher.task(e)), []).append(
            Utterance(e.id, item.duration, e.text, e.speaker, est))
    windows = []                                        # (dataset, language id, Window, task)
    for (dataset, lid, task), utts in partitions.items():
        packing = pack(utts, max_s=opts.pack_max_s, gap_s=opts.pack_gap_s, max_tokens=budget,
                       short_fraction=opts.pack_short)
        windows += [(dataset, lid, w, task) for w in packing.windows]
        # clips longer than --pack-max (and <= 30 s): a window of their own
        windows += [(dataset, lid, w, task) for u in packing.unpacked
                    for w in pack([u], max_s=N_SAMPLES / SAMPLE_RATE, gap_s=opts.pack_gap_s).windows]
    n_batches = math.ceil(len(windows) / global_b)
    n_clips = sum(len(w.members) for _, _, w, _ in windows)
    if is_main_process():
        print(f"dwjax pseudo-label: teacher {opts.teacher}; {n_examples} examples, {n_done} already labelled, "
              f"{len(pending)} to label: {n_clips} packed into {len(windows)} windows of <= {opts.pack_max_s:g} s "
              f"(gap {opts.pack_gap_s:g} s), {len(own_rows)} on their own; {n_batches} global batches of "
              f"{global_b} ({opts.batch_size} per device x {n_dev} devices, {n_local} rows per process x "
              f"{n_proc} processes)", flush=True)

    counts = dict.fromkeys(_TOTALS, 0)
    counts["audio_s"] = 0.0
    part_index = next_part_index(output, proc, n_proc)
    bar = None
    if is_main_process() and opts.progress and (n_batches or own_rows):
        bar = tqdm(total=len(windows) + len(own_rows), unit="window", dynamic_ncols=True, file=sys.stderr,
                   desc="pseudo-label --pack")

    def account(rows: list[dict]) -> None:
        for r in rows:
            counts["rows"] += 1
            if r["members"]:
                counts["windows"] += 1
                counts["packed_clips"] += len(json.loads(r["members"]))
            if r["status"] == "ok":
                counts["ok"] += 1
                counts["audio_s"] += _speech_seconds(r)
            elif is_failure(r["status"]):
                counts["failed"] += 1
                _report_failure(r, bar)

    # 2. rows of their own (failed / silent / unknown language / long-form), round-robin over processes
    buffer: list[dict] = []
    for i, item, failure in own_rows:
        if i % n_proc != proc:
            continue
        if failure is not None:
            buffer.append(_base_row(item.example, item.duration, failure))
        elif item.status == "long":
            buffer.append(_long_row(teacher, opts, item))
        else:
            buffer.append(_base_row(item.example, item.duration, item.status))
    account(buffer)
    if bar is not None:
        bar.update(len(own_rows))

    # 3. the windows: global batch g holds windows [g*B, (g+1)*B), this process decodes rows [lo, hi) of it
    def window_row(dataset: str, language: Optional[str], w, ids: list[int], avg_lp: float, nsp: float,
                   task: str, prob: Optional[float] = None) -> dict:
        members = [by_key[(dataset, m)].example for m in w.ids]
        e = Example(id=w.id, dataset=dataset, text=w.reference, language=members[0].language,
                    encoding_errors=any(m.encoding_errors for m in members))
        text = teacher.tok.decode(ids).strip()
        segs = teacher.tok.segments(ids, duration=w.duration_s)
        row = _label_row(e, w.duration_s, text, ids, language, avg_lp, nsp, segs, task, prob,
                         teacher.language_source(e))
        row.update(members=members_json(w, {m.id: {"audio": m.audio_path} for m in members}), source=w.source)
        if any(m.audio_bytes is not None for m in members):      # the loader cannot read these clips again
            row.update(member_audio_bytes=[m.audio_bytes for m in members])
        return row

    def decode_split(dataset: str, lid: int, w, audio: np.ndarray, task: str) -> list[dict]:
        """A window whose decoding reached the budget: its halves (recursively), decoded by this process."""
        language = teacher.code_of.get(lid) if lid >= 0 else None
        if len(w.members) == 1:
            ids, avg_lp, nsp = _local_decode(teacher, audio, language, task)[:3]
            row = window_row(dataset, language or "en", w, ids, avg_lp, nsp, task)
            if looped(teacher, ids):
                return [runaway_row(row, len(ids), w.duration_s)]
            counts["token_limit_truncated"] += 1
            return [row]
        counts["token_limit_splits"] += 1
        half = len(w.members) // 2
        rows = []
        for part in (w.members[:half], w.members[half:]):
            utts = [Utterance(m.id, m.duration_s, by_key[(dataset, m.id)].example.text, w.source) for m in part]
            sub = pack(utts, max_s=N_SAMPLES / SAMPLE_RATE, gap_s=opts.pack_gap_s).windows
            assert len(sub) == 1, "a half of a packed window must pack into one window"
            sub_w = sub[0]
            start = int(round(part[0].offset_s * SAMPLE_RATE))
            sub_audio = audio[start: start + int(round(sub_w.duration_s * SAMPLE_RATE))]
            ids, avg_lp, nsp, hit, lang = _local_decode(teacher, sub_audio, language, task)
            if hit and looped(teacher, ids):
                rows.append(runaway_row(window_row(dataset, language or lang or "en", sub_w, ids, avg_lp, nsp, task),
                                        len(ids), sub_w.duration_s))
            elif hit:
                rows += decode_split(dataset, lid, sub_w, sub_audio, task)
            else:
                rows.append(window_row(dataset, language or lang or "en", sub_w, ids, avg_lp, nsp, task))
        return rows

    def load_window(dataset: str, w) -> tuple[Optional[np.ndarray], Optional[str]]:
        try:
            clips = [_member_audio(by_key[(dataset, m)].example, by_key[(dataset, m)].audio) for m in w.ids]
            return window_audio(w, clips, gap_s=opts.pack_gap_s), None
        except Exception as err:  # a window must never stop the run
            return None, f"unreadable audio: {type(err).__name__}: {err}"

    def rows_of(g: int) -> list:
        start = g * global_b
        return windows[start + lo: min(start + hi, len(windows))]

    with cf.ThreadPoolExecutor(max_workers=max(1, opts.num_workers)) as pool:
        def submit(g: int):
            return [pool.submit(load_window, ds, w) for ds, _, w, _ in rows_of(g)] if g < n_batches else []

        ahead = submit(0)
        for g in range(n_batches):
            current, ahead = ahead, submit(g + 1)
            mine = rows_of(g)
            loaded = [f.result() for f in current]
            audio = np.zeros((n_local, N_SAMPLES), np.float32)
            lang = np.full((n_local,), -1, np.int32)
            task_ids = np.full((n_local,), -1, np.int32)
            for i, ((_, lid, _, task), (a, _)) in enumerate(zip(mine, loaded)):
                if a is not None:
                    audio[i, : len(a)] = a
                    lang[i] = lid
                    task_ids[i] = teacher.task_id(Example(id="", task=task))
            rows: list[dict] = []
            limit = teacher.limits([w.duration_s for _, _, w, _ in mine], n_local)
            if any(a is not None for a, _ in loaded) or n_proc > 1:
                active = np.zeros((n_local,), bool)          # padding and unreadable rows: not encoded
                active[: len(loaded)] = [a is not None for a, _ in loaded]
                out = teacher.run(audio, lang, global_b, task_ids, active, limit)
            for i, ((dataset, lid, w, task), (a, err)) in enumerate(zip(mine, loaded)):
                if a is None:
                    e = Example(id=w.id, dataset=dataset, text=w.reference)
                    row = _base_row(e, w.duration_s, err)
                    row.update(members=members_json(w), source=w.source)
                    rows.append(row)
                    continue
                n = int(out["lengths"][i])
                language = teacher.code_of.get(int(out["language"][i]), "en") if teacher.multilingual else "en"
                ids = out["tokens"][i, :n].tolist()
                # stopped: past its runaway limit, or at the budget with a looping text (never split: a loop
                # decoded again loops again); at the budget otherwise: too much speech, never a truncated window
                stopped = ran_away(teacher, ids, limit[i])
                if n >= teacher.max_new and not stopped:
                    if len(w.members) > 1:
                        rows += decode_split(dataset, lid, w, a, task)
                        continue
                    counts["token_limit_truncated"] += 1     # one clip: labelled as the per-clip path does
                prob = float(out["language_probability"][i]) if teacher.multilingual else None
                row = window_row(dataset, language, w, ids, float(out["sum_logprob"][i]) / (n + 1),
                                 float(out["no_speech_prob"][i]), task, prob)
                rows.append(runaway_row(row, n, w.duration_s) if stopped else row)
            account(rows)
            buffer.extend(rows)
            if buffer and ((g + 1) % opts.commit_every == 0 or g + 1 == n_batches):
                write_part(output, proc, n_proc, part_index, buffer)
                part_index += 1
                buffer = []
            if bar is not None:   # process 0's clip audio (no gaps), scaled to all processes
                bar.update(min(global_b, len(windows) - g * global_b))
                audio_s = counts["audio_s"] * n_proc
                bar.set_postfix_str(f"~{audio_s / 3600:.3f} h audio, ~{audio_s / max(time.time() - t0, 1e-9):.2f} "
                                    "audio-s/s", refresh=False)
    if buffer:
        write_part(output, proc, n_proc, part_index, buffer)
    if bar is not None:
        bar.close()
    counts["wall"] = time.time() - t0
    return counts


def _local_decode(teacher: "Teacher", audio: np.ndarray, language: Optional[str],
                  task: str) -> tuple[list[int], float, float, bool, Optional[str]]:
    """(tokens, avg_logprob, no_speech_prob, reached the budget, language) of one window, decoded by this process
    (`Teacher.local_transcriber`)."""
    tr = teacher.local_transcriber()
    t = tr.transcribe_batch([audio], language=language, task=task, timestamps=True,
                            max_new_tokens=teacher.max_new)[0]
    return list(t.tokens), float(t.avg_logprob), float(t.no_speech_prob), len(t.tokens) >= teacher.max_new, t.language

