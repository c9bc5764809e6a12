"""Progress bars for the benchmarks: tqdm on stderr, advanced only by finished work and outside timed regions.

    bar = progress(total, "bench_x", unit="audio-s")     # a float total shows one decimal
    tick(bar, n, "dwjax b8: 3.21 audio-s/s")               # after the timer stops: n units done, the rate as postfix
    echo("a stdout line")                                 # print(..., flush=True) without tearing the bar

`TQDM_DISABLE=1` turns the bars off.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total, desc: str, unit: str = "run") -> tqdm:
    fmt = None
    if isinstance(total, float):   # audio seconds: one decimal, the rate always per second ("3.21 audio-s/s")
        fmt = "{l_bar}{bar}| {n:.1f}/{total:.1f}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
        unit = " " + unit
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, bar_format=fmt)


def tick(bar: tqdm, n=1, note: str | None = None) -> None:
    if note is not None:
        bar.set_postfix_str(note, refresh=False)
    bar.update(n)


def echo(*args, file=None) -> None:
    file = file or sys.stdout
    with tqdm.external_write_mode(file=file):
        print(*args, file=file, flush=True)
