"""`dwjax get-game-speech`: real acted English speech from two freeware games in Debian main.

    dwjax get-game-speech --output DIR [--games fotaq,bass] [--packages-dir DIR]

Downloads `flight-of-the-amazon-queen` and `beneath-a-steel-sky` with `apt-get download` (no root needed, nothing
is installed) unless --packages-dir already holds their .deb files, unpacks them (`dpkg-deb -x`, or Python's own
ar/tar reader where dpkg-deb is missing) and writes

    DIR/fotaq/NAME.mp3        the MP3 entries of queen.1c, byte for byte (11,025 Hz)
    DIR/bass/NUMBER.flac      sky.dsk files 50000-59999, RNC-unpacked 8-bit PCM as 8-bit FLAC (11,025 Hz)
    DIR/GAME/COPYRIGHT, DIR/GAME/README-game.txt   the games' licences, which ask to travel with them
    DIR/manifest.jsonl        id, audio, duration_s, sample_rate, speaker, source: a dwjax manifest without text
    DIR/train.jsonl, DIR/heldout.jsonl   with --holdout F: a speaker-disjoint split (`split_by_speaker`);
                                         --train-hours H keeps about H hours of train.jsonl (`first_share`)

The clips are those of ../shared/data/unlabelled (same ids, names and durations). See dwjax/demo/game_speech.py.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
from pathlib import Path

from tqdm import tqdm

from dwjax.demo.game_speech import extract_bass, extract_fotaq
from dwjax.data.manifest import write_manifest
from dwjax.errors import UserError

GAMES = {
    "fotaq": {"package": "flight-of-the-amazon-queen", "files": ("queen.1c",),
              "what": "queen.1c, *.SB entries"},
    "bass": {"package": "beneath-a-steel-sky", "files": ("sky.dnr", "sky.dsk"),
             "what": "sky.dsk/sky.dnr files 50000-59999"},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwjax get-game-speech",
        description="Extract the voice casts of Flight of the Amazon Queen (fotaq) and Beneath a Steel Sky (bass), "
                    "freeware games in Debian main, as clips plus DIR/manifest.jsonl (no transcripts: "
                    "pseudo-label them). Downloads the two .deb files with apt-get unless --packages-dir has them.",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="where to write the clips and manifest")
    parser.add_argument("--games", default="fotaq,bass", help="comma-separated: fotaq, bass (default both)")
    parser.add_argument("--packages-dir", metavar="DIR",
                        help="a folder holding the .deb files (PACKAGE_VERSION_all.deb); those missing are "
                             "downloaded into a temporary folder")
    parser.add_argument("--holdout", type=float, default=0.0, metavar="F",
                        help="also write train.jsonl and heldout.jsonl: whole speaker groups holding about this "
                             "fraction of the clips go to heldout (deterministic; default 0: no split)")
    parser.add_argument("--train-hours", type=float, default=None, metavar="H",
                        help="with --holdout: keep about H hours of train.jsonl, the same share of every speaker "
                             "group (its first clips, in order; default: all)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def split_by_speaker(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, heldout): whole speaker groups, taken in the order of sha256(speaker), go to heldout until it holds
    at least `fraction` of the clips; a group larger than half the clips (fotaq's hero) always stays in train.
    A function of the speakers and their clip counts only, so every machine makes the same split."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--holdout must be between 0 and 1 (exclusive), not {fraction}")
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["speaker"]] = sizes.get(r["speaker"], 0) + 1
    order = sorted(sizes, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    held, n_held, target = set(), 0, fraction * len(rows)
    for speaker in order:
        if n_held >= target:
            break
        if sizes[speaker] > len(rows) / 2:
            continue
        held.add(speaker)
        n_held += sizes[speaker]
    return [r for r in rows if r["speaker"] not in held], [r for r in rows if r["speaker"] in held]


def first_share(rows: list[dict], hours: float) -> list[dict]:
    """About `hours` of `rows`: from every speaker group the same share of its clip time, its first clips in order
    (consecutive lines, so packing still joins neighbours; every speaker kept). A function of the rows alone."""
    if hours <= 0:
        raise UserError(f"--train-hours must be positive, not {hours}")
    total = sum(r["duration_s"] for r in rows)
    share = min(1.0, hours * 3600 / total) if total else 1.0
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["speaker"], []).append(r)
    keep = set()
    for group in groups.values():
        target, taken = share * sum(r["duration_s"] for r in group), 0.0
        for r in group:
            if taken >= target:
                break
            keep.add(r["id"])
            taken += r["duration_s"]
    return [r for r in rows if r["id"] in keep]


# ---------------------------------------------------------------- .deb handling

def find_deb(folder: str | os.PathLike | None, package: str) -> Path | None:
    if folder is None:
        return None
    found = sorted(Path(folder).glob(f"{package}_*.deb"))
    return found[-1] if found else None


def apt_download(packages: list[str], folder: Path) -> None:
    """`apt-get download` PACKAGES into FOLDER; one-line UserError when apt-get is missing or refuses."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise UserError("apt-get not found: download " + " ".join(f"{p}_*.deb" for p in packages)
                        + " from a Debian mirror (main) and pass their folder as --packages-dir")
    command = [apt, "download", "-q"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command += ["-o", "APT::Sandbox::User=root"]       # _apt cannot write into a root-owned temp folder
    command += packages
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"cannot run apt-get: {e.strerror or e}") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("E:")] or lines or [f"exit status {result.returncode}"]
        raise UserError(f"apt-get download {' '.join(packages)} failed: {errors[0]} "
                        "(no network or no Debian main in apt's sources? --packages-dir takes .deb files "
                        "fetched elsewhere)")


def _ar_members(data: bytes, where: str):
    if not data.startswith(b"!<arch>\n"):
        raise UserError(f"{where}: not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode("latin-1").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("latin-1").strip())
        except ValueError:
            raise UserError(f"{where}: corrupt .deb (bad ar member header)") from None
        body = data[pos + 60:pos + 60 + size]
        if len(body) < size:
            raise UserError(f"{where}: truncated .deb")
        yield name, body
        pos += 60 + size + (size & 1)


def extract_deb(deb: Path, target: Path) -> None:
    """Unpack a .deb's files into TARGET: dpkg-deb -x, else Python's own ar + tar reader."""
    target.mkdir(parents=True, exist_ok=True)
    dpkg = shutil.which("dpkg-deb")
    if dpkg is not None:
        result = subprocess.run([dpkg, "-x", str(deb), str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            message = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise UserError(f"{deb}: dpkg-deb -x failed: {message}")
        return
    for name, body in _ar_members(deb.read_bytes(), str(deb)):
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                    for member in tar:                   # regular files only, never outside TARGET
                        parts = Path(member.name).parts
                        if not member.isfile() or member.name.startswith("/") or ".." in parts:
                            continue
                        destination = target.joinpath(*[p for p in parts if p != "."])
                        destination.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as source, open(destination, "wb") as sink:
                            shutil.copyfileobj(source, sink)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise UserError(f"{deb}: cannot unpack {name} ({e}); install dpkg (dpkg-deb)") from None
            return
    raise UserError(f"{deb}: no data.tar member; not a .deb")


def deb_version(deb: Path) -> str:
    parts = deb.name[:-len(".deb")].split("_")
    return urllib.parse.unquote(parts[1]) if len(parts) >= 2 else "?"


def _find(root: Path, name: str, deb: Path) -> Path:
    found = sorted(p for p in root.rglob(name) if p.is_file())
    if not found:
        raise UserError(f"{deb}: has no {name}; not the expected game package")
    return found[0]


def _copy_docs(root: Path, package: str, out: Path) -> None:
    docs = root / "usr" / "share" / "doc" / package
    if (docs / "copyright").is_file():
        shutil.copyfile(docs / "copyright", out / "COPYRIGHT")
    for name in ("readme.txt.gz", "readme.txt"):
        if (docs / name).is_file():
            data = (docs / name).read_bytes()
            (out / "README-game.txt").write_bytes(gzip.decompress(data) if name.endswith(".gz") else data)
            break


# ---------------------------------------------------------------- command

def _progress_factory(enabled: bool):
    def progress(items, total, desc):
        if not enabled:
            return items
        return tqdm(items, total=total, desc=desc, unit="clip", file=sys.stderr, dynamic_ncols=True)
    return progress


def parse_games(text: str) -> list[str]:
    games = [g.strip().lower() for g in text.split(",") if g.strip()]
    unknown = [g for g in games if g not in GAMES]
    if unknown or not games:
        raise UserError(f"--games: unknown game(s) {', '.join(unknown) or '(none given)'}; choose from "
                        + ", ".join(GAMES))
    return list(dict.fromkeys(games))


def get_game_speech(output: str | os.PathLike, games: list[str], packages_dir: str | None = None,
                    progress: bool = True) -> tuple[list[dict], list[str], dict]:
    """Download (if needed), unpack and extract; returns (manifest rows, failures, per-game info)."""
    output = Path(output)
    if packages_dir is not None and not Path(packages_dir).is_dir():
        raise UserError(f"--packages-dir {packages_dir}: no such folder")
    show = _progress_factory(progress)
    rows, failures, info = [], [], {}
    with tempfile.TemporaryDirectory(prefix="dwjax-game-speech-") as tmp:
        tmp = Path(tmp)
        debs = {g: find_deb(packages_dir, GAMES[g]["package"]) for g in games}
        missing = [GAMES[g]["package"] for g in games if debs[g] is None]
        if missing:
            print(f"downloading {', '.join(missing)} with apt-get", file=sys.stderr)
            apt_download(missing, tmp)
            for g in games:
                if debs[g] is None:
                    debs[g] = find_deb(tmp, GAMES[g]["package"])
                    if debs[g] is None:
                        raise UserError(f"apt-get download gave no {GAMES[g]['package']}_*.deb")
        for game in games:
            package, deb = GAMES[game]["package"], debs[game]
            root = tmp / f"root-{game}"
            extract_deb(deb, root)
            files = [_find(root, name, deb) for name in GAMES[game]["files"]]
            source = f"Debian main package {package} {deb_version(deb)} ({GAMES[game]['what']})"
            start = time.perf_counter()
            if game == "fotaq":
                game_rows, game_failures = extract_fotaq(files[0], output, source, show)
            else:
                game_rows, game_failures = extract_bass(files[0], files[1], output, source, show)
            _copy_docs(root, package, output / game)
            shutil.rmtree(root, ignore_errors=True)
            rows += [r.as_dict() for r in game_rows]
            failures += game_failures
            info[game] = {"clips": len(game_rows), "hours": sum(r.duration_s for r in game_rows) / 3600,
                          "speakers": len({r.speaker for r in game_rows}), "seconds": time.perf_counter() - start,
                          "deb": deb.name}
    if rows:
        write_manifest(output / "manifest.jsonl", rows)
    return rows, failures, info


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    games = parse_games(args.games)
    if args.holdout and not 0.0 < args.holdout < 1.0:
        raise UserError(f"--holdout must be between 0 and 1 (exclusive), not {args.holdout}")
    if args.train_hours is not None and not args.holdout:
        raise UserError("--train-hours needs --holdout (it trims train.jsonl)")
    if args.train_hours is not None and args.train_hours <= 0:
        raise UserError(f"--train-hours must be positive, not {args.train_hours}")
    start = time.perf_counter()
    rows, failures, info = get_game_speech(args.output, games, args.packages_dir, progress=not args.no_progress)
    for game, i in info.items():
        print(f"{game}: {i['clips']} clips, {i['hours']:.2f} h, {i['speakers']} speaker groups, "
              f"from {i['deb']} in {i['seconds']:.0f} s")
    for failure in failures:
        print(f"dwjax get-game-speech: error: {failure}", file=sys.stderr)
    if not rows:
        raise UserError("no clips were extracted")
    print(f"wrote {len(rows)} clips and {Path(args.output) / 'manifest.jsonl'} in {time.perf_counter() - start:.0f} s")
    if args.holdout:
        train, heldout = split_by_speaker(rows, args.holdout)
        if args.train_hours is not None:
            train = first_share(train, args.train_hours)
        write_manifest(Path(args.output) / "train.jsonl", train)
        write_manifest(Path(args.output) / "heldout.jsonl", heldout)
        print(f"split by speaker: train.jsonl {len(train)} clips, {sum(r['duration_s'] for r in train) / 3600:.2f} h "
              f"({len({r['speaker'] for r in train})} speakers), "
              f"heldout.jsonl {len(heldout)} clips ({len({r['speaker'] for r in heldout})} speakers)")
    return 1 if failures else 0
