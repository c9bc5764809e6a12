"""Synthetic demo speech: sentences spoken by flite / espeak-ng voices, as 16 kHz mono FLAC + JSONL manifests.

    make_demo_data(output, hours=0.25, ...) -> DemoSummary

Layout written under `output`:
    audio/<id>.flac               16 kHz mono 16-bit FLAC
    train.jsonl, validation.jsonl, test.jsonl
        {"id", "audio": "audio/<id>.flac", "text", "duration_s", "voice", "effect", "language"}

Everything about clip `i` (its sentence, voice, speaking rate, pitch, noise or reverb) comes from
`random.Random(f"{seed}:{i}")`, and the file name carries a digest of those choices, so a run is
deterministic, a rerun skips the files that already exist, and a file is never reused for different
content. Files are written to a temporary name and renamed, so an interrupted run leaves no partial
FLAC behind. The clip count is the shortest prefix of the clip stream whose audio reaches `hours`.
Splits are made per sentence: every clip of one sentence lands in the same split.

Several languages (`languages=("en", "de", "fr", ...)`, `dwjax make-demo-data --languages en,de,fr`): clip `i` is
in language `languages[i % len(languages)]`, so every language gets about the same amount of audio. English clips
are made as above; the others speak the sentences written for the purpose in `multilingual_sentences.tsv`
(`dwjax.demo.sentences.translated_sentences`, cycled with fresh voices and rates) with espeak-ng's voice for the
language (ESPEAK_LANGUAGE_VOICES, with its male and female variants). Rows carry their `language`; those of other
languages than English also carry `translation` (the sentence's English translation), and each split with such
rows gets a second manifest `<split>.translate.jsonl` of the same clips with `task: translate` and the
translation as `text` (for scoring translation, e.g. BLEU in `dwjax evaluate`).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from dwjax.data.manifest import write_manifest
from dwjax.demo.sentences import iter_sentences, translated_sentences
from dwjax.errors import UserError
from dwjax.text.languages import resolve_language

__all__ = ["FLITE_VOICES", "ESPEAK_VOICES", "ESPEAK_LANGUAGE_VOICES", "DemoSummary", "make_demo_data", "parse_splits",
           "parse_languages", "check_tools"]

SAMPLE_RATE = 16_000
FLITE_VOICES = ("kal", "awb", "rms", "slt", "kal16")
# en-gb-scotland was left out: the teachers misheard it far more often than the others
ESPEAK_VOICES = ("en-us", "en", "en-gb-x-rp", "en+f3", "en-us+m3", "en-us+f4", "en+f2")
#: espeak-ng voices per language other than English: the language's voice with the m3 variant (the teacher heard it
#: best: base, 4 sentences a language, WER de 61 / fr 81 / es 53 % vs 67-82 / 103-158 / 57-77 % with the plain voice at
#: 130-160 wpm), twice as often as with the f3 variant
ESPEAK_LANGUAGE_VOICES = {lang: (f"{lang}+m3", f"{lang}+m3", f"{lang}+f3") for lang in ("de", "fr", "es", "it")}
TOOLS = ("flite", "espeak-ng", "sox")
INSTALL_HINT = "apt-get install flite espeak-ng sox"
DEFAULT_SPLITS = "train=0.9,validation=0.05,test=0.05"
_FIRST_GUESS_S = 3.2  # typical clip length, used only to size the first batch of work


def check_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not found; synthesising demo data needs: {INSTALL_HINT}")


def parse_splits(spec: str) -> dict[str, float]:
    """'train=0.9,validation=0.05,test=0.05' -> {'train': 0.9, ...} normalised to sum 1."""
    splits: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not sep or not name or not name.replace("_", "").replace("-", "").isalnum() or not (fraction >= 0):
            raise UserError(f"bad --splits entry {part.strip()!r}; expected NAME=FRACTION, e.g. {DEFAULT_SPLITS}")
        if name in splits:
            raise UserError(f"split {name!r} appears twice in --splits")
        splits[name] = fraction
    total = sum(splits.values())
    if not total > 0:
        raise UserError(f"--splits fractions must add up to more than 0, got {spec!r}")
    return {name: fraction / total for name, fraction in splits.items()}


@dataclass(frozen=True)
class Clip:
    """Everything needed to synthesise one clip; picklable, sent to the workers."""
    index: int
    text: str
    engine: str        # "flite" | "espeak-ng"
    voice: str
    rate: float        # flite: duration_stretch; espeak-ng: words per minute
    pitch: int         # espeak-ng only
    effect: str        # "clean" | "white" | "pink" | "reverb"
    amount: int        # SNR in dB for noise, reverberance (%) for reverb
    noise_seed: int
    language: str = "en"
    translation: str | None = None   # the English translation (clips of other languages)

    @property
    def voice_label(self) -> str:
        return f"{self.engine}:{self.voice}"

    @property
    def effect_label(self) -> str:
        if self.effect in ("white", "pink"):
            return f"{self.effect}-noise:{self.amount}dB"
        if self.effect == "reverb":
            return f"reverb:{self.amount}"
        return "clean"

    @property
    def clip_id(self) -> str:
        recipe = [self.text, self.engine, self.voice, self.rate, self.pitch, self.effect, self.amount,
                  self.noise_seed, SAMPLE_RATE] + ([] if self.language == "en" else [self.language])
        recipe = json.dumps(recipe, ensure_ascii=False)
        return f"{self.index:06d}-{hashlib.sha1(recipe.encode()).hexdigest()[:10]}"


def plan_clip(index: int, text: str, seed: int, noise: bool, language: str = "en",
              translation: str | None = None) -> Clip:
    rng = random.Random(f"dwjax-demo:{seed}:{index}")
    # flite is favoured: a Whisper teacher transcribes its voices best (espeak-ng WER ~3x higher)
    if language != "en":           # flite speaks English only
        rng.random()
        engine, voice = "espeak-ng", rng.choice(ESPEAK_LANGUAGE_VOICES[language])
        rate, pitch = float(rng.randrange(135, 156, 5)), rng.randrange(40, 61, 5)
    elif rng.random() < 0.65:
        engine, voice = "flite", rng.choice(FLITE_VOICES)
        rate, pitch = round(rng.uniform(0.9, 1.2), 2), 0
    else:
        engine, voice = "espeak-ng", rng.choice(ESPEAK_VOICES)
        rate, pitch = float(rng.randrange(130, 171, 5)), rng.randrange(35, 66, 5)
    effect, amount = "clean", 0
    if noise:
        roll = rng.random()
        if roll < 0.2:
            effect, amount = "white", rng.randint(10, 30)
        elif roll < 0.4:
            effect, amount = "pink", rng.randint(10, 30)
        elif roll < 0.55:
            effect, amount = "reverb", rng.randrange(30, 90, 10)
    return Clip(index, text, engine, voice, rate, pitch, effect, amount, rng.getrandbits(32), language, translation)


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{cmd[0]} failed ({result.returncode}): {message[-1] if message else ''}")


def _noise(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    # pink: shape the white spectrum by 1/sqrt(f)
    spectrum = np.fft.rfft(white)
    freqs = np.arange(spectrum.shape[0], dtype=np.float64)
    freqs[0] = 1.0
    return np.fft.irfft(spectrum / np.sqrt(freqs), n)


def synthesise(clip: Clip, path: Path) -> float:
    """Write `clip` to `path` (FLAC) unless it exists; return its duration in seconds."""
    if path.exists():
        return sf.info(str(path)).frames / SAMPLE_RATE
    with tempfile.TemporaryDirectory(prefix="dwjax-demo-") as tmp:
        text_file, raw, wav = Path(tmp, "text.txt"), Path(tmp, "raw.wav"), Path(tmp, "clip.wav")
        text_file.write_text(clip.text + "\n", encoding="utf-8")
        if clip.engine == "flite":
            _run(["flite", "-voice", clip.voice, "--setf", f"duration_stretch={clip.rate}",
                  "-f", str(text_file), "-o", str(raw)])
        else:
            _run(["espeak-ng", "-v", clip.voice, "-s", str(int(clip.rate)), "-p", str(clip.pitch),
                  "-f", str(text_file), "-w", str(raw)])
        effects = ["channels", "1", "rate", "-h", str(SAMPLE_RATE)]
        if clip.effect == "reverb":
            effects += ["pad", "0", "0.4", "reverb", str(clip.amount)]
        effects += ["gain", "-n", "-3"]
        # float output: no dither, so the result is bit-for-bit repeatable
        _run(["sox", "-R", "-D", str(raw), "-e", "floating-point", "-b", "32", str(wav)] + effects)
        audio, rate = sf.read(str(wav), dtype="float64")
        if rate != SAMPLE_RATE or audio.ndim != 1 or audio.size == 0:
            raise RuntimeError(f"sox produced unexpected audio for clip {clip.index} ({rate} Hz, shape {audio.shape})")
        if clip.effect in ("white", "pink"):
            noise = _noise(clip.effect, audio.size, clip.noise_seed)
            signal_power = float(np.mean(audio ** 2))
            noise_power = float(np.mean(noise ** 2))
            audio = audio + noise * math.sqrt(signal_power / (noise_power * 10 ** (clip.amount / 10)))
            peak = float(np.max(np.abs(audio)))
            if peak > 0.99:
                audio *= 0.99 / peak
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        sf.write(str(partial), audio.astype(np.float32), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        os.replace(partial, path)
    return audio.size / SAMPLE_RATE


def _synthesise_job(job: tuple[Clip, str]) -> float:
    clip, path = job
    return synthesise(clip, Path(path))


def _assign_splits(texts: list[str], splits: dict[str, float], seed: int) -> dict[str, str]:
    """Map each distinct sentence to a split. Sentences are ordered by a seeded hash and dealt out by
    largest remainder; every split with a positive fraction gets at least one sentence when possible."""
    distinct = list(dict.fromkeys(texts))
    order = sorted(distinct, key=lambda t: hashlib.sha1(f"{seed}\0{t}".encode()).hexdigest())
    n = len(order)
    names = list(splits)
    exact = {name: splits[name] * n for name in names}
    counts = {name: int(exact[name]) for name in names}
    for name in sorted(names, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[name] += 1
    positive = [name for name in names if splits[name] > 0]
    if n >= len(positive):
        for name in positive:
            if counts[name] == 0:
                donor = max(names, key=lambda k: counts[k])
                counts[donor] -= 1
                counts[name] = 1
    assignment, start = {}, 0
    for name in names:
        for text in order[start:start + counts[name]]:
            assignment[text] = name
        start += counts[name]
    return assignment


@dataclass
class DemoSummary:
    output: Path
    clips: dict[str, int] = field(default_factory=dict)
    hours: dict[str, float] = field(default_factory=dict)
    synthesised: int = 0   # clips written by this run (the rest already existed)
    translate: dict[str, int] = field(default_factory=dict)   # rows of <split>.translate.jsonl
    seconds: float = 0.0   # wall time

    def lines(self) -> list[str]:
        total_clips, total_hours = sum(self.clips.values()), sum(self.hours.values())
        out = [f"{self.output}: {total_clips} clips, {total_hours:.3f} h "
               f"({self.synthesised} synthesised, {total_clips - self.synthesised} already there) in {self.seconds:.1f} s"]
        out += [f"  {name + '.jsonl':<18} {self.clips[name]:>6} clips  {self.hours[name]:8.3f} h" for name in self.clips]
        out += [f"  {name + '.translate.jsonl':<18} {n:>6} clips  (task translate, English references)"
                for name, n in self.translate.items()]
        return out


def parse_languages(languages: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'en,de,fr' (or a sequence) -> ("en", "de", "fr"): Whisper codes (names accepted) that have demo voices and
    sentences; UserError naming the ones that do not."""
    items = [x.strip() for x in languages.split(",")] if isinstance(languages, str) else list(languages)
    out = []
    for item in items:
        if not item:
            continue
        code = resolve_language(item)
        if code != "en" and code not in ESPEAK_LANGUAGE_VOICES:
            raise UserError(f"no demo voices and sentences for language {item!r} ({code}); --languages takes "
                            f"en, {', '.join(sorted(ESPEAK_LANGUAGE_VOICES))}")
        if code not in out:
            out.append(code)
    if not out:
        raise UserError("--languages names no language")
    return tuple(out)


def _read_text_file(path: str | os.PathLike) -> list[str]:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read --text file {path}: {e.strerror or e}") from None
    lines = [" ".join(line.split()) for line in raw.decode("utf-8", errors="replace").splitlines()]
    lines = list(dict.fromkeys(line for line in lines if line))
    if not lines:
        raise UserError(f"--text file {path} has no non-empty lines")
    return lines


def make_demo_data(
    output: str | os.PathLike,
    hours: float = 0.25,
    text_file: str | os.PathLike | None = None,
    noise: bool = False,
    seed: int = 0,
    workers: int | None = None,
    splits: str | dict[str, float] = DEFAULT_SPLITS,
    progress: bool = True,
    languages: tuple[str, ...] | list[str] = ("en",),
) -> DemoSummary:
    """Synthesise about `hours` of speech into `output` (see the module docstring)."""
    check_tools()
    if not hours > 0:
        raise UserError(f"--hours must be > 0, got {hours}")
    languages = parse_languages(languages)
    if text_file is not None and languages != ("en",):
        raise UserError("--text speaks English sentences; it cannot be combined with --languages")
    fractions = parse_splits(splits) if isinstance(splits, str) else dict(splits)
    workers = max(1, workers or os.cpu_count() or 1)
    output = Path(output)
    audio_dir = output / "audio"
    try:
        audio_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {audio_dir}: {e.strerror or e}") from None

    if text_file is not None:
        lines = _read_text_file(text_file)
        english_at = lambda i: lines[i % len(lines)]  # noqa: E731 - cycles with fresh voices when exhausted
    else:
        stream, cache = iter_sentences(seed), []

        def english_at(i: int) -> str:
            while len(cache) <= i:
                cache.append(next(stream))
            return cache[i]
    translated = {lang: translated_sentences(lang) for lang in languages if lang != "en"}

    def plan(i: int) -> Clip:
        """Clip i of the stream: its language cycles through `languages`; the k-th clip of a language speaks
        that language's k-th sentence (English: the k-th of the English stream)."""
        language, k = languages[i % len(languages)], i // len(languages)
        if language == "en":
            return plan_clip(i, english_at(k if len(languages) > 1 else i), seed, noise)
        sentence, english = translated[language][k % len(translated[language])]
        return plan_clip(i, sentence, seed, noise, language, english)

    target_s = hours * 3600.0
    started = time.perf_counter()
    clips: list[Clip] = []
    durations: list[float] = []
    existing = 0

    # progress on stderr (tqdm's default stream): audio made so far, clips and the rate in audio-s/s
    bar = tqdm(total=hours, desc="synthesising", unit="h", disable=not progress, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} audio-h [{elapsed}<{remaining}{postfix}]")
    pool = None
    if workers > 1:
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        total_s = 0.0
        while total_s < target_s:
            average = total_s / len(durations) if durations else _FIRST_GUESS_S
            batch = max(workers, math.ceil((target_s - total_s) / max(average, 0.5) * 1.05))
            start = len(clips)
            new = [plan(i) for i in range(start, start + batch)]
            jobs = [(clip, str(audio_dir / f"{clip.clip_id}.flac")) for clip in new]
            already = {path for _, path in jobs if os.path.exists(path)}
            if pool is None:
                results = (_synthesise_job(job) for job in jobs)
            else:
                futures = [pool.submit(_synthesise_job, job) for job in jobs]
                results = (future.result() for future in futures)
            for (clip, path), duration in zip(jobs, results):
                existing += path in already
                clips.append(clip)
                durations.append(duration)
                total_s += duration
                bar.update(min(duration, max(target_s - (total_s - duration), 0.0)) / 3600.0)
                elapsed = time.perf_counter() - started
                bar.set_postfix_str(f"{len(clips)} clips, {total_s / max(elapsed, 1e-9):.1f} audio-s/s", refresh=False)
                if total_s >= target_s:
                    break
            if pool is not None:
                for future in futures:
                    future.cancel()
    except RuntimeError as e:
        raise UserError(f"speech synthesis failed: {e}") from None
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    assignment = _assign_splits([clip.text for clip in clips], fractions, seed)
    summary = DemoSummary(output=output, seconds=time.perf_counter() - started)
    for name in fractions:
        rows = [
            {"id": clip.clip_id, "audio": f"audio/{clip.clip_id}.flac", "text": clip.text,
             "duration_s": round(duration, 4), "voice": clip.voice_label, "effect": clip.effect_label,
             "language": clip.language, **({"translation": clip.translation} if clip.translation else {})}
            for clip, duration in zip(clips, durations) if assignment[clip.text] == name
        ]
        write_manifest(output / f"{name}.jsonl", rows)
        summary.clips[name] = len(rows)
        summary.hours[name] = sum(row["duration_s"] for row in rows) / 3600.0
        translate = [{**{k: v for k, v in row.items() if k != "translation"}, "text": row["translation"],
                      "task": "translate"} for row in rows if row.get("translation")]
        if translate:
            write_manifest(output / f"{name}.translate.jsonl", translate)
            summary.translate[name] = len(translate)
    summary.synthesised = len(clips) - existing
    return summary
