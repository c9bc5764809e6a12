"""Evaluation of a model (optionally with a speculative assistant) on datasets: WER and its parts, hallucination
counts, speed, long-form and noise robustness. Used by `dwjax evaluate`; `dwjax report` plots the results.

Per set: normalised WER (Whisper English normaliser, corpus level), orthographic WER (raw text), insertion /
substitution / deletion rates, repeated 5-grams (per file and summed), real-time factor (wall time / audio time,
after one untimed warm-up batch so compilation is not counted) and audio seconds per second. Macro averages over the
sets. Long-form: recordings over 30 s use `method`; sets of short clips are also concatenated (in order, 0.5 s
pauses) into recordings of `long_form_seconds` and transcribed with the long-form method. Noise: each utterance is
mixed with white noise, babble (the sum of `babble_talkers` other utterances of the set) or a noise file at each SNR,
with a seed fixed per utterance (dwjax/evaluation_sets.py builds the noisy copies and the long recordings;
dwjax/evaluation_tables.py writes the results as markdown).

Languages (dwjax/text/languages.py decides how each is scored). Each utterance has a language: its manifest
`language`, else the forced `language` option, else the one the model detects (English for English-only models);
and a task: its manifest `task`, else the `task` option (a translate row's reference is an English translation).
The set's WER normalises each pair with its row's normaliser (English for English and translations, OpenAI's basic
normaliser otherwise). `languages` in each set's results holds, per (language, task): the error rate the language
is scored with ("metric": "wer", or "cer" for languages written without spaces), BLEU (sacrebleu's corpus BLEU on
the raw texts) for translations, the model's language-ID accuracy against the manifest language
(`lid_accuracy`) and, with `teacher`, its agreement with the teacher's detected language (`lid_agreement`, the
fraction of clips where both detect the same language; the teacher only runs language detection). `language`
"manifest" forces each row's manifest language (rows without one are detected); then the model's own detection
is run apart for the language-ID figures.

Bad inputs do not stop an evaluation: an utterance whose audio cannot be used (missing, unreadable, truncated,
empty, non-finite), a row whose reference is not written in its language's script ("mixed scripts"), the rows of
a language the model cannot handle (an unknown code, a language outside its vocabulary, a non-English language
for an English-only model: one failure per set and language) and a dataset that cannot be read at all are reported through `on_failure` as they are found
(`dwjax evaluate` prints one line each on stderr) and listed in the results (`failures`: set, id, audio, error;
per set `failed` and `failures`); every other utterance is scored. Only when nothing at all can be scored does
`evaluate` raise. Progress (optional): a tqdm bar on stderr per pass, in audio-s/s.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
import sacrebleu

from dwjax.audio import N_SAMPLES, SAMPLE_RATE, load_audio, load_audio_bytes
from dwjax.data.manifest import parse_spec, read_dataset
from dwjax.decoding.longform import transcribe_long
from dwjax.decoding.speculative import SpeculativeTranscriber
from dwjax.decoding.transcribe import AudioProgress, Transcriber
from dwjax.errors import AudioError, UserError
from dwjax.evaluation_sets import long_recordings, noisy_audio
from dwjax.text.languages import check_language, normalizer, resolve_language, script_problem
from dwjax.text.languages import score as language_score
from dwjax.text.wer import error_rates, repeated_ngrams

RATE_KEYS = ("wer", "orthographic_wer", "ier", "ser", "der")


@dataclasses.dataclass
class EvalOptions:
    batch_size: int = 8
    max_samples: Optional[int] = None
    long_form: Optional[str] = None          # None, "chunked" or "sequential"
    long_form_seconds: float = 180.0
    chunk_length: Optional[float] = None
    noise: Optional[str] = None              # None, "white", "babble" or a noise file
    snrs: Sequence[float] = (20, 10, 5, 0, -5)
    babble_talkers: int = 4
    seed: int = 0
    max_new_tokens: int = 224
    language: Optional[str] = None           # None: detect; a code: forced; "manifest": each row's own
    task: str = "transcribe"                 # rows without a manifest task
    teacher: Optional[str] = None            # a model whose language detection the model's is compared with
    k: int = 5                               # speculative draft tokens


class Item(tuple):
    """One utterance to score: unpacks as (id, reference text, audio); `.language` (a Whisper code, or None when
    the manifest has none) and `.task` ("transcribe" / "translate", or None) come from the manifest."""

    def __new__(cls, id_: str, text: str, audio, language: Optional[str] = None, task: Optional[str] = None):
        self = super().__new__(cls, (id_, text, audio))
        self.language, self.task = language, task
        return self


def read_set(spec: str, max_samples: Optional[int] = None):
    """(name, [Item], [failure]) of a dataset spec (anything `read_dataset` accepts).

    An example whose audio cannot be used, whose language is not a Whisper language, or whose reference is not
    written in its language's script is a failure {"set", "id", "audio", "error"}, not an item (one failure per
    unknown language, however many rows have it); a manifest that cannot be read, or that lacks reference text,
    raises UserError."""
    name, _ = parse_spec(spec)
    examples = read_dataset(spec)
    if max_samples:
        examples = examples[:max_samples]
    items, failures, unknown = [], [], {}
    for ex in examples:
        if ex.text is None:
            raise UserError(f"{spec}: example {ex.id} has no reference text; evaluation needs transcripts")
        language = None
        if ex.language:
            try:
                language = resolve_language(ex.language)
            except UserError as e:
                unknown.setdefault(ex.language, [0, str(e)])[0] += 1
                continue
        problem = script_problem(ex.text, "en" if ex.task == "translate" else language)
        if problem is not None:
            failures.append({"set": name, "id": ex.id, "audio": ex.audio_path, "error": f"reference text: {problem}"})
            continue
        try:
            audio = load_audio(ex.audio_path) if ex.audio_path else load_audio_bytes(ex.audio_bytes, name=ex.id)
        except AudioError as e:
            failures.append({"set": name, "id": ex.id, "audio": ex.audio_path, "error": str(e)})
            continue
        items.append(Item(ex.id, ex.text, audio, language, ex.task))
    for code, (n, error) in unknown.items():
        failures.append({"set": name, "id": None, "audio": None, "error": f"{n} row(s) not scored: {error}"})
    return name, items, failures


def load_set(spec: str, max_samples: Optional[int] = None):
    """(name, [(id, reference text, audio)]) of a dataset spec; raises on the first unusable example."""
    name, items, failures = read_set(spec, max_samples)
    if failures:
        raise AudioError(f"{name}/{failures[0]['id']}: {failures[0]['error']}")
    if not items:
        raise UserError(f"{spec}: no examples")
    return name, items


def score(refs: Sequence[str], hyps: Sequence[str], languages: Optional[Sequence[Optional[str]]] = None) -> dict:
    """WER parts (normalised), orthographic WER and repeated 5-grams of paired texts. Each pair is normalised with
    the normaliser of its language (`languages`, one per pair; None: English, see dwjax/text/languages.py)."""
    if languages is not None and any(lang not in (None, "en") for lang in languages):
        refs_n = [normalizer(lang)(r) for r, lang in zip(refs, languages)]
        hyps_n = [normalizer(lang)(h) for h, lang in zip(hyps, languages)]
        norm = error_rates(refs_n, hyps_n, normalize=False)
    else:
        norm = error_rates(refs, hyps, normalize=True)
    orth = error_rates(refs, hyps, normalize=False)
    rep = [repeated_ngrams(h, 5, normalize=True) for h in hyps]
    return {"wer": norm["wer"], "orthographic_wer": orth["wer"], "ier": norm["ier"], "ser": norm["ser"],
            "der": norm["der"], "n_ref_words": norm["n_ref_words"], "n_empty_refs": norm["n_empty_refs"],
            "repeated_5grams": int(sum(rep)), "repeated_5grams_per_file": rep,
            "repeated_5grams_ref": int(sum(repeated_ngrams(r, 5, normalize=True) for r in refs))}


def _progress(audios, desc: str, enabled: bool):
    return AudioProgress([len(a) / SAMPLE_RATE for a in audios], desc, enabled=enabled)


def _timed_transcribe(transcriber, audios, opts, desc: str = "evaluate", progress: bool = False, groups=None,
                      **kw):
    """(transcripts, wall seconds) of `audios`; `groups` (see `_groups`) decodes each group with its keywords."""
    groups = groups if groups is not None else [(kw, list(range(len(audios))))]
    if audios:   # warm-up: compile the buckets outside the timing
        first_kw, first = groups[0]
        _transcribe_all(transcriber, [audios[i] for i in first[: transcriber.batch_size]], opts, **first_kw)
        if hasattr(transcriber, "reset_stats"):
            transcriber.reset_stats()
    with _progress(audios, desc, progress) as bar:
        t0 = time.perf_counter()
        out = _transcribe_groups(transcriber, audios, opts, groups, bar.callback)
        wall = time.perf_counter() - t0
    return out, wall


def _groups(items, opts: EvalOptions) -> list[tuple[dict, list[int]]]:
    """(decoding keywords, indices into items): one group per forced language (None: detected) and task."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        language = it.language if opts.language == "manifest" else opts.language
        groups.setdefault((language, it.task or opts.task), []).append(i)
    return [(dict(max_new_tokens=opts.max_new_tokens, language=lang, task=task), idx)
            for (lang, task), idx in groups.items()]


def _transcribe_groups(transcriber, audios, opts: EvalOptions, groups, progress: Optional[Callable] = None):
    out = [None] * len(audios)
    for kw, idx in groups:
        cb = None if progress is None else (lambda done, idx=idx: progress([idx[j] for j in done]))
        for i, r in zip(idx, _transcribe_all(transcriber, [audios[i] for i in idx], opts, progress=cb, **kw)):
            out[i] = r
    return out


def detect_languages(transcriber, audios) -> list[Optional[str]]:
    """The language each clip's first 30 s are detected as (None for English-only models): Whisper's language
    detection only (encoder and one decoder step), batched like `transcribe`."""
    if not transcriber.tokenizer.is_multilingual:
        return [None] * len(audios)
    out: list[Optional[str]] = []
    for start in range(0, len(audios), transcriber.batch_size):
        batch = list(audios[start: start + transcriber.batch_size])
        padded = transcriber.pad(batch)
        enc = transcriber.generator.encode(transcriber.features(padded))
        out += transcriber._languages(enc, None, len(padded))[: len(batch)]
    return out


def _bleu(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100, its default 13a tokenisation) of the raw texts."""
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def _language_table(items, results, languages, tasks, detected, teacher_detected) -> list[dict]:
    """Per (language, task) of a set: error rate, BLEU (translations), language-ID accuracy and agreement."""
    by: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(languages, tasks)):
        by.setdefault(key, []).append(i)
    table = []
    for (lang, task), idx in sorted(by.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        refs = [items[i][1] for i in idx]
        hyps = [results[i].text for i in idx]
        s = language_score("en" if task == "translate" else lang, refs, hyps)
        row = {"language": lang, "task": task, "n": len(idx), "metric": s["metric"], "error_rate": s["rate"],
               "n_ref": s["n_ref"], "bleu": _bleu(refs, hyps) if task == "translate" else None,
               "lid_accuracy": None, "lid_agreement": None, "teacher_lid_accuracy": None,
               "detected": {}}
        known = [i for i in idx if items[i].language is not None]
        if detected is not None:
            for i in idx:
                row["detected"][str(detected[i])] = row["detected"].get(str(detected[i]), 0) + 1
            if known:
                row["lid_accuracy"] = sum(detected[i] == items[i].language for i in known) / len(known)
            if teacher_detected is not None:
                row["lid_agreement"] = sum(detected[i] == teacher_detected[i] for i in idx) / len(idx)
        if teacher_detected is not None and known:
            row["teacher_lid_accuracy"] = sum(teacher_detected[i] == items[i].language for i in known) / len(known)
        table.append(row)
    return table


def make_transcriber(model: str, assistant: Optional[str] = None, batch_size: int = 8, dtype: str = "float32",
                     k: int = 5):
    tr = Transcriber(model, dtype=dtype, batch_size=batch_size)
    if assistant:
        tr = SpeculativeTranscriber(tr, assistant, k=k)
    return tr


def evaluate_set(transcriber, name: str, items, opts: EvalOptions, progress: bool = False,
                 lid_teacher=None) -> dict:
    """Scores of one set (module docstring); `lid_teacher`: a Transcriber whose detected languages the model's
    are compared with."""
    groups = _groups(items, opts)
    audios = [a for _, _, a in items]
    refs = [t for _, t, _ in items]
    results, wall = _timed_transcribe(transcriber, audios, opts, desc=f"evaluate {name}", progress=progress,
                                      groups=groups)
    hyps = [r.text for r in results]
    multilingual = transcriber.tokenizer.is_multilingual
    if not multilingual:
        detected = None
    elif opts.language is None:
        detected = [r.language for r in results]
    elif hasattr(transcriber, "generator"):          # forced: the model's own detection, run apart
        detected = detect_languages(transcriber, audios)
    else:
        detected = None
    teacher_detected = detect_languages(lid_teacher, audios) if lid_teacher is not None else None
    tasks = [it.task or opts.task for it in items]
    languages = [it.language or (None if opts.language in (None, "manifest") else _code(opts.language))
                 or (detected[i] if detected is not None else None) or ("en" if not multilingual else None)
                 for i, it in enumerate(items)]
    scored_as = ["en" if t == "translate" else lang for lang, t in zip(languages, tasks)]
    audio_s = sum(len(a) for a in audios) / SAMPLE_RATE
    out = {"name": name, "n": len(items), "audio_s": audio_s, "wall_s": wall, "rtf": wall / audio_s,
           "audio_s_per_s": audio_s / wall if wall > 0 else math.inf, **score(refs, hyps, scored_as)}
    out["languages"] = _language_table(items, results, languages, tasks, detected, teacher_detected)
    out["files"] = [{"id": i, "reference": r, "hypothesis": h, "repeated_5grams": n5, "language": lang,
                     "task": task, "detected_language": None if detected is None else detected[k],
                     "teacher_detected_language": None if teacher_detected is None else teacher_detected[k]}
                    for k, ((i, r, _), h, n5, lang, task) in enumerate(
                        zip(items, hyps, out.pop("repeated_5grams_per_file"), languages, tasks))]
    if hasattr(transcriber, "stats"):
        out["speculative"] = transcriber.stats.to_dict()
    if opts.long_form:
        out["long_form"] = evaluate_long_form(transcriber, items, opts, progress=progress, name=name)
    if opts.noise:
        out["noise"] = {"kind": opts.noise, "snr": {}}
        for snr in opts.snrs:
            noisy = noisy_audio(items, opts.noise, snr, opts.seed, opts.babble_talkers)
            kind = opts.noise if opts.noise in ("white", "babble") else "noise"
            with _progress(noisy, f"evaluate {name} {kind} {snr:g} dB", progress) as bar:
                hyp_n = [r.text for r in _transcribe_groups(transcriber, noisy, opts, groups, bar.callback)]
            s = score(refs, hyp_n, scored_as)
            s.pop("repeated_5grams_per_file")
            out["noise"]["snr"][str(snr)] = s
    return out


def _code(language: str) -> str:
    return resolve_language(language)


def _transcribe_all(transcriber, audios, opts: EvalOptions, progress: Optional[Callable] = None, **kw):
    """Clips <= 30 s through `transcribe` (batched); longer ones through `transcribe_long` with the chosen method.
    `progress(indices)` is called as clips finish (indices into `audios`)."""
    short = [i for i, a in enumerate(audios) if len(a) <= N_SAMPLES]
    out = [None] * len(audios)
    if short:
        extra = {} if progress is None else {"progress": lambda idx: progress([short[j] for j in idx])}
        for i, r in zip(short, transcriber.transcribe([audios[i] for i in short], **extra, **kw)):
            out[i] = r
    for i in (i for i in range(len(audios)) if out[i] is None):
        out[i] = transcribe_long(transcriber, audios[i], method=opts.long_form or "chunked",
                                 chunk_length=opts.chunk_length, **kw)
        if progress is not None:
            progress([i])
    return out


def evaluate_long_form(transcriber, items, opts: EvalOptions, progress: bool = False, name: str = "") -> dict:
    recs = long_recordings(items, opts.long_form_seconds)
    hyps, wall, audio_s = [], 0.0, 0.0
    desc = f"evaluate {name} long-form" if name else "evaluate long-form"
    with _progress([a for _, a in recs], desc, progress) as bar:
        for k, (ref, audio) in enumerate(recs):
            t0 = time.perf_counter()
            r = transcribe_long(transcriber, audio, method=opts.long_form, chunk_length=opts.chunk_length,
                                max_new_tokens=opts.max_new_tokens, task=opts.task,
                                language=None if opts.language == "manifest" else opts.language)
            wall += time.perf_counter() - t0
            audio_s += len(audio) / SAMPLE_RATE
            hyps.append(r.text)
            bar.callback([k])
    s = score([r for r, _ in recs], hyps)
    return {"method": opts.long_form, "recordings": len(recs), "audio_s": audio_s, "wall_s": wall,
            "rtf": wall / audio_s, **s}


def macro(sets: list[dict]) -> dict:
    out = {}
    for key in RATE_KEYS + ("rtf",):
        vals = [s[key] for s in sets if s.get(key) is not None and not math.isnan(s[key])]
        out[key] = float(np.mean(vals)) if vals else math.nan
    out["repeated_5grams"] = int(sum(s["repeated_5grams"] for s in sets))
    lf = [s["long_form"] for s in sets if "long_form" in s]
    if lf:
        out["long_form_wer"] = float(np.mean([s["wer"] for s in lf]))
    nz = [s["noise"] for s in sets if "noise" in s]
    if nz:
        snrs = list(nz[0]["snr"])
        out["noise"] = {snr: float(np.mean([n["snr"][snr]["wer"] for n in nz])) for snr in snrs}
    return out


def _usable_items(name: str, items, tokenizer, model: str, opts: EvalOptions):
    """(the items `model` can decode, one failure per language / task of the set it cannot): a language outside
    its vocabulary, a non-English language or a translation for an English-only model."""
    forced = opts.language not in (None, "manifest")
    refused: dict[str, list] = {}
    keep = []
    for it in items:
        reason = None
        if (it.task or opts.task) == "translate" and not tokenizer.is_multilingual:
            reason = f"{model} is English-only and cannot translate"
        elif it.language is not None and not forced:
            try:
                check_language(it.language, tokenizer, model)
            except UserError as e:
                reason = str(e)
        if reason is None:
            keep.append(it)
        else:
            refused.setdefault(reason, []).append(it)
    failures = [{"set": name, "id": None, "audio": None,
                 "error": f"{len(rows)} row(s) of language {rows[0].language or 'en'!r} not scored: {reason}"}
                for reason, rows in refused.items()]
    return keep, failures


def _print_failure(failure: dict) -> None:
    where = f"{failure['set']}/{failure['id']}" if failure.get("id") is not None else failure["set"]
    print(f"evaluate: error: {where}: {failure['error']}", file=sys.stderr, flush=True)


def evaluate(model: str, data: Sequence[str], assistant: Optional[str] = None, opts: Optional[EvalOptions] = None,
             dtype: str = "float32", transcriber=None, log=print, on_failure: Optional[Callable[[dict], None]] = None,
             progress: bool = False) -> dict:
    """Evaluate `model` (+ `assistant`) on each dataset spec; returns the results dictionary (see module doc).

    Each unusable utterance or unreadable dataset is passed to `on_failure` (default: one line on stderr) and
    listed in `results["failures"]`; the rest is scored. Raises UserError when no utterance at all can be scored.
    `progress`: tqdm bars on stderr."""
    opts = opts or EvalOptions()
    on_failure = on_failure or _print_failure
    if opts.long_form not in (None, "chunked", "sequential"):
        raise UserError(f"unknown long-form method {opts.long_form!r}; use chunked or sequential")
    if opts.task not in ("transcribe", "translate"):
        raise UserError(f"task must be transcribe or translate, not {opts.task!r}")
    tr = transcriber
    if opts.language not in (None, "manifest"):      # the run's option: a bad one refuses the run (one line)
        _code(opts.language)                         # an unknown code, before any model is loaded
        tr = tr or make_transcriber(model, assistant, opts.batch_size, dtype, opts.k)
        check_language(opts.language, tr.tokenizer, model)
    loaded, failures = [], []
    for spec in data:
        try:
            name, items, bad = read_set(spec, opts.max_samples)
        except UserError as e:
            if len(data) == 1:
                raise                 # the only dataset: its one-line error is the whole story
            bad, name, items = [{"set": str(spec), "id": None, "audio": None, "error": str(e)}], None, []
        for f in bad:
            on_failure(f)
        failures += bad
        if items:
            loaded.append((name, items, bad))
        elif name is not None and not bad:
            failures.append({"set": name, "id": None, "audio": None, "error": f"{spec}: no examples"})
            on_failure(failures[-1])
    if not loaded:
        raise UserError(f"nothing to evaluate: all {len(failures)} input(s) failed (named above)" if failures
                        else "nothing to evaluate: no examples")
    tr = tr or make_transcriber(model, assistant, opts.batch_size, dtype, opts.k)
    checked = []
    for name, items, bad in loaded:
        items, refused = _usable_items(name, items, tr.tokenizer, model, opts)
        for f in refused:
            on_failure(f)
        bad, failures = bad + refused, failures + refused
        if items:
            checked.append((name, items, bad))
    if not checked:
        raise UserError(f"nothing to evaluate: all {len(failures)} input(s) failed (named above)")
    lid_teacher = None
    if opts.teacher:
        lid_teacher = make_transcriber(opts.teacher, batch_size=opts.batch_size, dtype=dtype)
        if not lid_teacher.tokenizer.is_multilingual:
            raise UserError(f"--teacher {opts.teacher} is English-only: it detects no language to compare with")
    sets = []
    for name, items, bad in checked:
        log(f"evaluating {model}{' + ' + assistant if assistant else ''} on {name} ({len(items)} utterances"
            + (f", {len(bad)} failed" if bad else "") + ")")
        s = evaluate_set(tr, name, items, opts, progress=progress, lid_teacher=lid_teacher)
        s["failed"], s["failures"] = len(bad), bad
        sets.append(s)
    cfg = tr.cfg
    made_as = (getattr(getattr(tr, "loaded", None), "metadata", None) or {}).get("kind")   # init-student: "student"
    return {"model": model, "assistant": assistant,
            "label": model.split("/")[-1].replace("builtin:", "") + (f" + {assistant.split('/')[-1]}" if assistant
                                                                       else ""),
            "kind": "teacher+assistant" if assistant else (made_as or ("student" if cfg.decoder_layers <= 2
                                                                       else "teacher")),
            "decoder_layers": cfg.decoder_layers, "encoder_layers": cfg.encoder_layers, "dtype": dtype,
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()},
            "sets": sets, "macro": macro(sets), "n_failed": len(failures), "failures": failures}
