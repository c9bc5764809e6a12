"""dwjax get-game-speech / dwjax.demo.game_speech: synthetic containers in the documented formats (default run),
and the real extraction against ../shared/data/unlabelled (slow)."""
from __future__ import annotations

import csv
import io
import json
import os
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dwjax.cli import main as dwjax_main
from dwjax.cli import get_game_speech as cli
from dwjax.demo import game_speech as gs
from dwjax.data.manifest import read_dataset
from dwjax.errors import UserError

SHARED_UNLABELLED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "unlabelled"


# ---------------------------------------------------------------- builders

def _mp3_bytes(seconds: float, freq: float) -> bytes:
    t = np.arange(int(seconds * gs.SAMPLE_RATE)) / gs.SAMPLE_RATE
    buffer = io.BytesIO()
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * freq * t), gs.SAMPLE_RATE, format="MP3")
    return buffer.getvalue()


def make_queen1c(entries: list[tuple[str, bytes]], compression: int = 1) -> bytes:
    """A rebuilt queen.1c: QTBL header, index, then the entries' bytes."""
    header = b"QTBL" + b"CEM10\0" + b"\0\0" + bytes([compression]) + struct.pack(">H", len(entries))
    offset = len(header) + 21 * len(entries)
    table, blobs = b"", b""
    for name, data in entries:
        table += name.encode().ljust(12, b"\0") + struct.pack(">BII", 1, offset + len(blobs), len(data))
        blobs += data
    return header + table + blobs


def sky_file(pcm: bytes, packed: bool) -> bytes:
    """One sky.dsk file: a 22-byte header (flag bit 7 = RNC-packed) and the (packed) PCM."""
    import propack

    header = struct.pack("<11H", 0x81 if packed else 0x01, *([0x8080] * 10))
    return header + (propack.pack(pcm, method=1) if packed else pcm)


def make_sky(files: dict[int, bytes], block_offsets: set[int] = frozenset()) -> tuple[bytes, bytes]:
    """(sky.dnr, sky.dsk); files in `block_offsets` get the 'offset in 16-byte units' flag (bit 23)."""
    dsk, dnr = bytearray(), bytearray(struct.pack("<I", len(files)))
    for number, data in files.items():
        if number in block_offsets:
            dsk += b"\0" * (-len(dsk) % 16)
            offset = (len(dsk) >> 4) | 1 << 23
        else:
            offset = len(dsk)
        dnr += struct.pack("<H", number) + offset.to_bytes(3, "little") + len(data).to_bytes(3, "little")
        dsk += data
    return bytes(dnr), bytes(dsk)


def tone_u8(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    wave = 128 + 60 * np.sin(np.arange(n) / 7.0) + rng.integers(-3, 4, n)
    return bytes(np.clip(wave, 0, 255).astype(np.uint8))


def make_deb(path: Path, package: str, files: dict[str, bytes]) -> Path:
    """A minimal .deb (ar: debian-binary, control.tar.gz, data.tar.xz) holding `files` (paths inside the root)."""
    def tar(members: dict[str, bytes], mode: str) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode=mode) as t:
            for name, data in members.items():
                info = tarfile.TarInfo("./" + name)
                info.size, info.mode = len(data), 0o644
                t.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    control = f"Package: {package}\nVersion: 9.9-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", tar({"control": control.encode()}, "w:gz")),
               ("data.tar.xz", tar(files, "w:xz"))]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    deb = path / f"{package}_9.9-1_all.deb"
    deb.write_bytes(bytes(out))
    return deb


@pytest.fixture(scope="module")
def mp3s():
    return {"020001P2.SB": _mp3_bytes(0.8, 440.0), "JOE00161.SB": _mp3_bytes(1.3, 300.0)}


@pytest.fixture(scope="module")
def sky_pcm():
    return {50007: tone_u8(3000, 0), 50601: tone_u8(1500, 1), 52500: tone_u8(2205, 2)}


@pytest.fixture()
def fake_debs(tmp_path, mp3s, sky_pcm):
    queen = make_queen1c([("ROOM1.PCX", b"not speech" * 10), *mp3s.items()])
    dnr, dsk = make_sky({100: b"\x01\0" + b"\0" * 40,
                         50007: sky_file(sky_pcm[50007], packed=True),
                         50601: sky_file(sky_pcm[50601], packed=False),
                         52500: sky_file(sky_pcm[52500], packed=True)}, block_offsets={50007, 52500})
    folder = tmp_path / "debs"
    folder.mkdir()
    make_deb(folder, "flight-of-the-amazon-queen", {
        "usr/share/scummvm/flight-of-the-amazon-queen/queen.1c": queen,
        "usr/share/doc/flight-of-the-amazon-queen/copyright": b"freeware\n"})
    make_deb(folder, "beneath-a-steel-sky", {
        "usr/share/scummvm/beneath-a-steel-sky/sky.dnr": dnr,
        "usr/share/scummvm/beneath-a-steel-sky/sky.dsk": dsk,
        "usr/share/doc/beneath-a-steel-sky/copyright": b"freeware\n"})
    return folder


# ---------------------------------------------------------------- Flight of the Amazon Queen

def test_qtbl_index_and_mp3_entries(tmp_path, mp3s):
    path = tmp_path / "queen.1c"
    path.write_bytes(make_queen1c([("ROOM1.PCX", b"x" * 50), *mp3s.items()]))
    with open(path, "rb") as f:
        index = gs.read_qtbl(f)
    assert (index.version, index.compression) == ("CEM10", "mp3")
    assert [e.name for e in index.entries] == ["ROOM1.PCX", "020001P2.SB", "JOE00161.SB"]
    rows, failures = gs.extract_fotaq(path, tmp_path / "out", source="test")
    assert failures == []
    assert [r.id for r in rows] == ["fotaq_020001P2", "fotaq_JOE00161"]
    for row, (name, data) in zip(rows, mp3s.items()):
        written = (tmp_path / "out" / row.audio).read_bytes()
        assert written == data                                     # byte for byte
        info = sf.info(io.BytesIO(data))
        assert row.duration_s == pytest.approx(info.frames / info.samplerate, abs=1e-3)
        assert row.sample_rate == 11025
    assert [r.speaker for r in rows] == ["fotaq:dialogue-02", "fotaq:joe"]


def test_qtbl_corrupt_containers(tmp_path, mp3s):
    good = make_queen1c(list(mp3s.items()))
    cases = {"magic": b"XTBL" + good[4:], "truncated index": good[:30],
             "entry past the end": good[:-100], "not mp3": make_queen1c(list(mp3s.items()), compression=2)}
    for what, data in cases.items():
        path = tmp_path / f"{what}.1c"
        path.write_bytes(data)
        with pytest.raises(UserError) as error:
            gs.extract_fotaq(path, tmp_path / "out")
        assert str(path) in str(error.value) and "\n" not in str(error.value), what


def test_damaged_mp3_entry_is_reported_and_neighbours_kept(tmp_path, mp3s):
    path = tmp_path / "queen.1c"
    path.write_bytes(make_queen1c([("020006J1.SB", b"\0" * 300), *mp3s.items()]))
    rows, failures = gs.extract_fotaq(path, tmp_path / "out")
    assert len(rows) == 2 and len(failures) == 1 and "020006J1" in failures[0]


@pytest.mark.parametrize("stem, speaker", [
    ("020001P2", "dialogue-02"), ("020006J1", "joe"), ("0200A4P1", "dialogue-02"), ("12XXXXP1", "dialogue-12"),
    ("05SSSSJ2", "joe"), ("020001PA", "dialogue-02"), ("JOE00161", "joe"), ("C41B_212", "cutaway-C41B"), ("C5C__123", "cutaway-C5C"),
    ("COMIC051", "cutaway-COMIC"), ("1000SSSS", "other-####SSSS"), ("21SSSSSS", "other-##SSSSSS"),
])
def test_fotaq_speaker(stem, speaker):
    assert gs.fotaq_speaker(stem) == speaker


# ---------------------------------------------------------------- Beneath a Steel Sky

def test_dnr_dsk_rnc_speech(tmp_path, sky_pcm):
    files = {100: b"\x01\0" + b"\0" * 40, 50007: sky_file(sky_pcm[50007], packed=True),
             50601: sky_file(sky_pcm[50601], packed=False), 52500: sky_file(sky_pcm[52500], packed=True)}
    dnr, dsk = make_sky(files, block_offsets={50007, 52500})
    entries = gs.read_dnr(dnr)
    assert set(entries) == set(files)
    assert entries[50007].offset % 16 == 0 and entries[50007].size == len(files[50007])
    (tmp_path / "sky.dnr").write_bytes(dnr)
    (tmp_path / "sky.dsk").write_bytes(dsk)
    rows, failures = gs.extract_bass(tmp_path / "sky.dnr", tmp_path / "sky.dsk", tmp_path / "out")
    assert failures == []
    assert [r.id for r in rows] == ["bass_50007", "bass_50601", "bass_52500"]    # file 100 is not speech
    for row in rows:
        pcm = sky_pcm[int(row.id[5:])]
        audio, rate = sf.read(tmp_path / "out" / row.audio, dtype="int16")
        assert rate == 11025 and sf.info(tmp_path / "out" / row.audio).subtype == "PCM_S8"
        np.testing.assert_array_equal(audio, (np.frombuffer(pcm, np.uint8).astype(np.int16) - 128) * 256)
        assert row.duration_s == round(len(pcm) / 11025, 3)
    assert [r.speaker for r in rows] == ["bass:section-0", "bass:section-1", "bass:section-3"]


def test_damaged_rnc_entry_is_reported_and_neighbours_kept(tmp_path, sky_pcm):
    broken = bytearray(sky_file(sky_pcm[50007], packed=True))
    broken[40:60] = b"\xff" * 20
    dnr, dsk = make_sky({50007: bytes(broken), 50601: sky_file(sky_pcm[50601], packed=True)})
    (tmp_path / "sky.dnr").write_bytes(dnr)
    (tmp_path / "sky.dsk").write_bytes(dsk)
    rows, failures = gs.extract_bass(tmp_path / "sky.dnr", tmp_path / "sky.dsk", tmp_path / "out")
    assert [r.id for r in rows] == ["bass_50601"]
    assert len(failures) == 1 and failures[0].startswith("bass 50007:")


def test_sky_corrupt_containers(tmp_path, sky_pcm):
    dnr, dsk = make_sky({50007: sky_file(sky_pcm[50007], packed=True)})
    for what, (d, k) in {"dnr truncated": (dnr[:6], dsk), "dsk truncated": (dnr, dsk[:20]),
                         "no speech": (make_sky({7: b"\0" * 30})[0], dsk)}.items():
        (tmp_path / "sky.dnr").write_bytes(d)
        (tmp_path / "sky.dsk").write_bytes(k)
        with pytest.raises(UserError) as error:
            gs.extract_bass(tmp_path / "sky.dnr", tmp_path / "sky.dsk", tmp_path / "out")
        assert "\n" not in str(error.value), what


# ---------------------------------------------------------------- the command

def test_cli_from_packages_dir(tmp_path, fake_debs, capsys):
    out = tmp_path / "speech"
    assert dwjax_main(["get-game-speech", "--output", str(out), "--packages-dir", str(fake_debs),
                       "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "fotaq: 2 clips" in printed and "bass: 3 clips" in printed
    examples = read_dataset(out / "manifest.jsonl")
    assert [e.id for e in examples] == ["fotaq_020001P2", "fotaq_JOE00161", "bass_50007", "bass_50601",
                                        "bass_52500"]
    assert all(e.text is None and e.duration_s > 0 and Path(e.audio_path).is_file() for e in examples)
    assert examples[0].speaker == "fotaq:dialogue-02" and examples[2].speaker == "bass:section-0"
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows[0]["source"] == ("Debian main package flight-of-the-amazon-queen 9.9-1 "
                                 "(queen.1c, *.SB entries)") and rows[0]["sample_rate"] == 11025
    assert (out / "fotaq" / "COPYRIGHT").read_bytes() == b"freeware\n"


def test_cli_one_game_without_dpkg_deb(tmp_path, fake_debs, monkeypatch):
    real_which = cli.shutil.which
    monkeypatch.setattr(cli.shutil, "which", lambda name: None if name == "dpkg-deb" else real_which(name))
    out = tmp_path / "speech"
    assert dwjax_main(["get-game-speech", "--output", str(out), "--games", "bass", "--packages-dir",
                       str(fake_debs), "--no-progress"]) == 0
    assert [e.id for e in read_dataset(out / "manifest.jsonl")] == ["bass_50007", "bass_50601", "bass_52500"]
    assert not (out / "fotaq").exists()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    return err[-1]


def test_cli_no_apt_get(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    assert dwjax_main(["get-game-speech", "--output", str(tmp_path / "o"), "--no-progress"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("dwjax get-game-speech: error: apt-get not found") and "--packages-dir" in line


def test_cli_download_refused(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package beneath-a-steel-sky' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert dwjax_main(["get-game-speech", "--output", str(tmp_path / "o"), "--games", "bass",
                       "--no-progress"]) == 1
    line = _one_error_line(capsys)
    assert "apt-get download beneath-a-steel-sky failed: E: Unable to locate package" in line


def test_cli_corrupt_deb_and_bad_games(tmp_path, capsys):
    folder = tmp_path / "debs"
    folder.mkdir()
    (folder / "beneath-a-steel-sky_1_all.deb").write_bytes(b"not an archive")
    assert dwjax_main(["get-game-speech", "--output", str(tmp_path / "o"), "--games", "bass",
                       "--packages-dir", str(folder), "--no-progress"]) == 1
    assert _one_error_line(capsys).startswith("dwjax get-game-speech: error: ")
    assert dwjax_main(["get-game-speech", "--output", str(tmp_path / "o"), "--games", "monkey"]) == 1
    assert "unknown game(s) monkey" in _one_error_line(capsys)


# ---------------------------------------------------------------- the real packages (slow)

@pytest.mark.slow
def test_real_extraction_matches_shared_unlabelled(tmp_path):
    """apt-get download both packages, extract everything, compare with ../shared/data/unlabelled."""
    if not (SHARED_UNLABELLED / "manifest.tsv").is_file():
        pytest.skip(f"{SHARED_UNLABELLED}/manifest.tsv is absent (only the maintainers' machines have ../shared)")
    out = tmp_path / "speech"
    start = time.perf_counter()
    assert dwjax_main(["get-game-speech", "--output", str(out), "--no-progress"]) == 0
    print(f"full extraction: {time.perf_counter() - start:.0f} s")
    with open(SHARED_UNLABELLED / "manifest.tsv", newline="") as f:
        shared = {row["id"]: row for row in csv.DictReader(f, delimiter="\t")}
    ours = {e.id: e for e in read_dataset(out / "manifest.jsonl")}
    assert set(ours) == set(shared)
    for id_, row in shared.items():
        assert ours[id_].duration_s == pytest.approx(float(row["duration_s"]), abs=0.01), id_
        assert os.path.relpath(ours[id_].audio_path, out) == row["path"]
    rng = np.random.default_rng(0)
    fotaq = sorted(i for i in shared if i.startswith("fotaq_"))
    bass = sorted(i for i in shared if i.startswith("bass_"))
    for id_ in rng.choice(fotaq, 200, replace=False):          # MP3: the very bytes
        assert Path(ours[id_].audio_path).read_bytes() == (SHARED_UNLABELLED / shared[id_]["path"]).read_bytes()
    for id_ in rng.choice(bass, 200, replace=False):           # FLAC 8-bit: the same samples (lossless)
        a, ra = sf.read(ours[id_].audio_path, dtype="int16")
        b, rb = sf.read(SHARED_UNLABELLED / shared[id_]["path"], dtype="int16")
        assert ra == rb == 11025
        np.testing.assert_array_equal(a, b)


def test_split_by_speaker_is_disjoint_deterministic_and_keeps_the_hero_in_train():
    from dwjax.cli.get_game_speech import split_by_speaker
    rows = [{"id": f"j{i}", "speaker": "fotaq:joe"} for i in range(60)]
    rows += [{"id": f"d{g}-{i}", "speaker": f"fotaq:dialogue-{g:02d}"} for g in range(10) for i in range(4)]
    train, held = split_by_speaker(rows, 0.1)
    speakers_train, speakers_held = {r["speaker"] for r in train}, {r["speaker"] for r in held}
    assert not speakers_train & speakers_held                       # speaker-disjoint
    assert "fotaq:joe" in speakers_train                            # the group over half the clips never held out
    assert len(train) + len(held) == len(rows) and {r["id"] for r in train + held} == {r["id"] for r in rows}
    assert 10 <= len(held) < 10 + 4                                 # whole groups until >= 10 % of 100 clips
    assert split_by_speaker(list(reversed(rows)), 0.1)[1] == list(reversed(held))   # order-free choice
    with pytest.raises(Exception, match="--holdout"):
        split_by_speaker(rows, 1.5)


def test_first_share_takes_the_same_share_of_every_speaker_in_order():
    from dwjax.cli.get_game_speech import first_share
    rows = [{"id": f"a{i}", "speaker": "a", "duration_s": 2.0} for i in range(30)]        # 60 s
    rows += [{"id": f"b{i}", "speaker": "b", "duration_s": 3.0} for i in range(10)]       # 30 s
    rows = [r for pair in zip(rows[:10], rows[30:]) for r in pair] + rows[10:30]           # interleaved, then a
    kept = first_share(rows, 45 / 3600)                                                    # half of the 90 s
    assert [r["id"] for r in kept if r["speaker"] == "a"] == [f"a{i}" for i in range(15)]  # 30 s of a's 60
    assert [r["id"] for r in kept if r["speaker"] == "b"] == [f"b{i}" for i in range(5)]   # 15 s of b's 30
    assert [r["id"] for r in kept] == [r["id"] for r in rows if r in kept]                 # manifest order kept
    assert first_share(rows, 10.0) == rows                                                 # more than there is
    with pytest.raises(Exception, match="--train-hours"):
        first_share(rows, 0)
