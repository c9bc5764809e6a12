"""Real acted speech from two freeware adventure games that Debian ships in main.

    flight-of-the-amazon-queen (fotaq)  queen.1c: a 'QTBL' resource index; every `*.SB` entry is one spoken line,
                                        stored as an MP3 (11,025 Hz mono); written out byte for byte as `NAME.mp3`.
    beneath-a-steel-sky (bass)          sky.dnr (the index) + sky.dsk (the data): files 50000-59999 are speech,
                                        a 22-byte header then 8-bit unsigned PCM at 11,025 Hz, mostly RNC-packed
                                        (unpacked with the PyPI package `propack`); written as 8-bit FLAC, lossless.

This is the extraction that produced ../shared/data/unlabelled (same ids, names, bytes and durations); the command
that downloads the packages and writes a manifest is `dwjax get-game-speech` (dwjax/cli/get_game_speech.py).

Container layouts (as ScummVM's engines/queen/resource.cpp and engines/sky/disk.cpp read them):

  queen.1c   'QTBL' | version (6 bytes) | 2 bytes | compression (1 byte: 1 MP3, 2 Vorbis, 3 FLAC)
             | entry count (uint16 BE) | entries of 21 bytes: name (12 bytes, NUL padded), bundle (uint8),
             offset (uint32 BE, from the start of the file), size (uint32 BE)
  sky.dnr    entry count (uint32 LE) | entries of 8 bytes: file number (uint16 LE), offset (24 bits LE; bit 23
             set means the offset counts 16-byte units), flags (24 bits LE; low 22 bits the stored size)
  sky.dsk    the data the offsets point at; a file starts with a 22-byte header (11 uint16 LE) whose first word
             has bit 7 set when the rest is RNC-packed ('RNC' signature, method 1)

Speakers (the `speaker` field of the manifest, which packing never mixes in one window):
  fotaq  dialogue lines are named `KKhhhhJn` / `KKhhhhPn` (KK the dialogue, hhhh its node in hex or XXXX/SSSS,
         n the segment, hex): J is Joe, the hero (one voice throughout), P the character Joe talks to in dialogue KK,
         so the speaker is `joe` or `dialogue-KK`; `JOE*` lines are Joe's; cutaway scenes (`C41B_212`, `COMIC051`)
         are grouped by scene (`cutaway-C41B`), other lines by their name pattern.
  bass   the game's own sections (its speech table: files 50000+[0, 600, 1100, 2430, 3380, 4530, 5080, 5230, ...])
         are the only grouping the files reveal: `section-N`.
"""
from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
import propack
import soundfile as sf

from dwjax.errors import UserError

__all__ = [
    "SAMPLE_RATE", "QtblEntry", "QueenIndex", "read_qtbl", "iter_queen_speech", "fotaq_speaker",
    "DnrEntry", "read_dnr", "SkyDisk", "sky_speech_pcm", "bass_section", "write_pcm_u8_flac",
    "extract_fotaq", "extract_bass", "ClipRow",
]

SAMPLE_RATE = 11025
QTBL_MAGIC = b"QTBL"
QTBL_HEADER = 4 + 6 + 2 + 1               # magic, version, 2 bytes, compression
QTBL_ENTRY = 21
QUEEN_COMPRESSION = {0: "none", 1: "mp3", 2: "ogg", 3: "flac"}
SKY_HEADER = 22                          # DataFileHeader: 11 uint16 LE
SKY_SPEECH_FIRST, SKY_SPEECH_LAST = 50000, 59999
# Sky::Sound::_speechConvertTable: the first speech file (minus 50000) of each game section
SKY_SECTION_STARTS = (0, 600, 1100, 2430, 3380, 4530, 5080, 5230)


# ---------------------------------------------------------------- Flight of the Amazon Queen

@dataclass(frozen=True)
class QtblEntry:
    name: str
    bundle: int
    offset: int
    size: int


@dataclass(frozen=True)
class QueenIndex:
    version: str
    compression: str
    entries: tuple[QtblEntry, ...]


def read_qtbl(f: BinaryIO, where: str = "queen.1c") -> QueenIndex:
    """The resource index at the start of a rebuilt (compressed) queen.1c. Raises UserError on a corrupt one."""
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    f.seek(0)
    header = f.read(QTBL_HEADER + 2)
    if len(header) < QTBL_HEADER + 2 or header[:4] != QTBL_MAGIC:
        raise UserError(f"{where}: not a QTBL resource file (starts {header[:4]!r}, expected {QTBL_MAGIC!r})")
    version = header[4:10].rstrip(b"\0").decode("latin-1")
    compression = QUEEN_COMPRESSION.get(header[12], f"unknown ({header[12]})")
    (count,) = struct.unpack(">H", header[13:15])
    table = f.read(count * QTBL_ENTRY)
    if len(table) < count * QTBL_ENTRY:
        raise UserError(f"{where}: truncated QTBL index ({count} entries announced, "
                        f"{len(table) // QTBL_ENTRY} present)")
    entries = []
    for i in range(count):
        raw = table[i * QTBL_ENTRY:(i + 1) * QTBL_ENTRY]
        name = raw[:12].split(b"\0", 1)[0].decode("latin-1")
        bundle, offset, size = struct.unpack(">BII", raw[12:])
        if not name or offset + size > file_size:
            raise UserError(f"{where}: corrupt QTBL entry {i} ({name!r}: offset {offset} + size {size} "
                            f"beyond the file's {file_size} bytes)")
        entries.append(QtblEntry(name, bundle, offset, size))
    return QueenIndex(version, compression, tuple(entries))


def iter_queen_speech(f: BinaryIO, index: QueenIndex) -> Iterator[tuple[QtblEntry, bytes]]:
    """(entry, bytes) for every `*.SB` (speech) entry, in index order."""
    for entry in index.entries:
        if entry.name.upper().endswith(".SB"):
            f.seek(entry.offset)
            yield entry, f.read(entry.size)


_DIALOGUE = re.compile(r"^(\d\d)([0-9A-Fa-f]{4}|XXXX|SSSS)([JP])[0-9A-Fa-f]$")
_CUTAWAY = re.compile(r"^(C\d+[A-Z]?)_")


def fotaq_speaker(stem: str) -> str:
    """The speaker key of a FOTAQ speech file (its name without .SB/.mp3); see the module docstring."""
    stem = stem.upper()
    m = _DIALOGUE.match(stem)
    if m:
        return "joe" if m.group(3) == "J" else f"dialogue-{m.group(1)}"
    if stem.startswith("JOE"):
        return "joe"
    m = _CUTAWAY.match(stem)
    if m:
        return f"cutaway-{m.group(1)}"
    if re.match(r"^C[A-Z]+\d+$", stem):                 # COMIC051, CINTR202, CDINT...: named cutaways
        return "cutaway-" + re.sub(r"\d+$", "", stem)
    return "other-" + re.sub(r"\d", "#", stem)          # e.g. 21SSSSSS, 1000SSSS: grouped by pattern


# ---------------------------------------------------------------- Beneath a Steel Sky

@dataclass(frozen=True)
class DnrEntry:
    number: int
    offset: int          # in bytes, already scaled
    size: int
    flags: int           # the 24-bit flags word (size in its low 22 bits)


def read_dnr(data: bytes, where: str = "sky.dnr", offset_shift: int = 4) -> dict[int, DnrEntry]:
    """The 'dinner table' index of sky.dsk. `offset_shift` is 4 for every release but v0.0331 (3)."""
    if len(data) < 4:
        raise UserError(f"{where}: truncated (no entry count)")
    (count,) = struct.unpack("<I", data[:4])
    if len(data) < 4 + 8 * count:
        raise UserError(f"{where}: truncated ({count} entries announced, {(len(data) - 4) // 8} present); "
                        "not a sky.dnr index")
    entries = {}
    for i in range(count):
        raw = data[4 + 8 * i:12 + 8 * i]
        number = raw[0] | raw[1] << 8
        offset = int.from_bytes(raw[2:5], "little")
        flags = int.from_bytes(raw[5:8], "little")
        if offset >> 23:
            offset = (offset & 0x7FFFFF) << offset_shift
        entries[number] = DnrEntry(number, offset, flags & 0x3FFFFF, flags)
    return entries


class SkyDisk:
    """sky.dsk read through its sky.dnr index."""

    def __init__(self, dnr: bytes, dsk: BinaryIO, where: str = "sky.dsk"):
        self.entries = read_dnr(dnr)
        self.dsk, self.where = dsk, where
        dsk.seek(0, os.SEEK_END)
        self.size = dsk.tell()
        bad = [e.number for e in self.entries.values() if e.offset + e.size > self.size]
        if bad:
            raise UserError(f"{where}: {len(bad)} file(s) of the index lie beyond its {self.size} bytes "
                            f"(first: {bad[0]}); sky.dnr and sky.dsk do not belong together or one is truncated")

    def speech_numbers(self) -> list[int]:
        return sorted(n for n in self.entries if SKY_SPEECH_FIRST <= n <= SKY_SPEECH_LAST)

    def read(self, number: int) -> bytes:
        entry = self.entries[number]
        self.dsk.seek(entry.offset)
        return self.dsk.read(entry.size)


def sky_speech_pcm(raw: bytes) -> bytes:
    """8-bit unsigned PCM of one stored speech file: its 22-byte header dropped, the rest RNC-unpacked when the
    header says so. Raises ValueError on a damaged file."""
    if len(raw) < SKY_HEADER:
        raise ValueError(f"{len(raw)} bytes, shorter than the {SKY_HEADER}-byte header")
    flag = raw[0] | raw[1] << 8
    body = raw[SKY_HEADER:]
    if (flag >> 7) & 1 and body[:3] == b"RNC":
        try:
            return bytes(propack.unpack(body))
        except Exception as e:                           # propack raises ValueError and friends on bad data
            raise ValueError(f"RNC unpacking failed: {e}") from None
    return bytes(body)


def bass_section(number: int) -> int:
    index = number - SKY_SPEECH_FIRST
    section = 0
    for i, start in enumerate(SKY_SECTION_STARTS):
        if index >= start:
            section = i
    return section


def write_pcm_u8_flac(path: str | os.PathLike, pcm: bytes, sample_rate: int = SAMPLE_RATE) -> int:
    """8-bit unsigned PCM -> 8-bit FLAC (lossless); returns the number of samples."""
    samples = (np.frombuffer(pcm, np.uint8).astype(np.int16) - 128) << 8
    sf.write(os.fspath(path), samples, sample_rate, subtype="PCM_S8", format="FLAC")
    return len(samples)


# ---------------------------------------------------------------- extraction

@dataclass(frozen=True)
class ClipRow:
    id: str
    audio: str           # relative to the output directory
    duration_s: float
    sample_rate: int
    speaker: str
    source: str

    def as_dict(self) -> dict:
        return {"id": self.id, "audio": self.audio, "duration_s": self.duration_s, "sample_rate": self.sample_rate,
                "speaker": self.speaker, "source": self.source}


Progress = Callable[[Iterable, int, str], Iterable]


def _no_progress(items, total, desc):
    return items


def _mp3_duration(data: bytes) -> float | None:
    try:
        info = sf.info(io.BytesIO(data))
        return round(info.frames / info.samplerate, 3)
    except Exception:                                     # a damaged MP3: no duration, the bytes are still written
        return None


def extract_fotaq(queen1c: str | os.PathLike, output: str | os.PathLike, source: str = "",
                  progress: Progress = _no_progress) -> tuple[list[ClipRow], list[str]]:
    """Write every speech entry of queen.1c to OUTPUT/fotaq/NAME.mp3. Returns (rows, failures)."""
    queen1c, out = Path(queen1c), Path(output) / "fotaq"
    out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    with open(queen1c, "rb") as f:
        index = read_qtbl(f, str(queen1c))
        if index.compression != "mp3":
            raise UserError(f"{queen1c}: speech is stored as {index.compression}, expected mp3 "
                            "(the Debian flight-of-the-amazon-queen package's queen.1c)")
        speech = [e for e in index.entries if e.name.upper().endswith(".SB")]
        if not speech:
            raise UserError(f"{queen1c}: the QTBL index has no .SB (speech) entries")
        for entry, data in progress(iter_queen_speech(f, index), len(speech), "fotaq"):
            stem = entry.name.rsplit(".", 1)[0]
            duration = _mp3_duration(data)
            if duration is None or len(data) != entry.size:
                failures.append(f"fotaq {entry.name}: not a readable MP3 ({len(data)} bytes)")
                continue
            (out / f"{stem}.mp3").write_bytes(data)
            rows.append(ClipRow(f"fotaq_{stem}", f"fotaq/{stem}.mp3", duration, SAMPLE_RATE,
                                f"fotaq:{fotaq_speaker(stem)}", source))
    return rows, failures


def _bass_file(job: tuple[int, bytes, str]) -> tuple[int, int, str | None]:
    """(number, samples written, None) for one stored speech file unpacked and written as FLAC, or (number, 0,
    why) when it is damaged or empty (nothing written)."""
    number, raw, path = job
    try:
        pcm = sky_speech_pcm(raw)
    except ValueError as e:
        return number, 0, str(e)
    if not pcm:
        return number, 0, "empty"
    return number, write_pcm_u8_flac(path, pcm), None


def extract_bass(dnr: str | os.PathLike, dsk: str | os.PathLike, output: str | os.PathLike, source: str = "",
                 progress: Progress = _no_progress) -> tuple[list[ClipRow], list[str]]:
    """Write sky.dsk's speech files 50000-59999 to OUTPUT/bass/NUMBER.flac. Returns (rows, failures)."""
    dnr, dsk, out = Path(dnr), Path(dsk), Path(output) / "bass"
    out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    with open(dsk, "rb") as f:
        disk = SkyDisk(dnr.read_bytes(), f, str(dsk))
        numbers = disk.speech_numbers()
        if not numbers:
            raise UserError(f"{dnr}: no speech files (numbers {SKY_SPEECH_FIRST}-{SKY_SPEECH_LAST}) in the index")
        jobs = ((number, disk.read(number), os.fspath(out / f"{number}.flac")) for number in numbers)
        workers = max(1, min(os.cpu_count() or 1, 8))
        # RNC unpacking is pure Python: the files are unpacked and written by one process per core (spawned, not
        # forked: the parent may hold threads), in order
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = pool.map(_bass_file, jobs, chunksize=32)
            for number, frames, error in progress(done, len(numbers), "bass"):
                if error:
                    failures.append(f"bass {number}: {error}")
                    continue
                rows.append(ClipRow(f"bass_{number}", f"bass/{number}.flac", round(frames / SAMPLE_RATE, 3),
                                    SAMPLE_RATE, f"bass:section-{bass_section(number)}", source))
    return rows, failures
