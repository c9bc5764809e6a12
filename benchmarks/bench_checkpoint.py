"""How long the training loop is blocked by a checkpoint save: asynchronous vs synchronous.

    python benchmarks/bench_checkpoint.py                  # base-shaped 6-2 student + Adam state, 3 saves each
    python benchmarks/bench_checkpoint.py --repeats 5 --dir /fast/disk/tmp

The state is the parameters of a Whisper-base-shaped student with 2 decoder layers plus Adam moments and a step
and rng, saved with `dwjax.checkpoint.Checkpointer` exactly as training does. "blocked" is the wall time of
`save(...)`; for the asynchronous save the background write is then awaited (outside the timed region, as if
training ran meanwhile) and its total time is reported too. Synchronous = `checkpoint.async_save: false`.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from _progress import progress, tick
from dwjax.checkpoint import Checkpointer, verify_step_dir, write_manifest
from dwjax.config import CheckpointConfig
from dwjax.models import configs, whisper


def student_state():
    cfg = configs.official("base").replace(decoder_layers=2)
    params = whisper.init_params(cfg)
    opt_state = optax.adamw(1e-4).init(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.array(0, jnp.int32), "rng": jax.random.key(0)}
    return jax.block_until_ready(state)


def bench(directory: Path, state, async_save: bool, repeats: int, bar,
          mib: float) -> tuple[list[float], list[float]]:
    cfg = CheckpointConfig(save_every=1, keep_last=2, keep_best=0, async_save=async_save)
    blocked, total = [], []
    with Checkpointer(directory, cfg) as ckpt:
        for i in range(repeats + 1):  # the first save warms up (directories, thread pools, tensorstore)
            state = {**state, "step": jnp.array(i + 1, jnp.int32)}
            t0 = time.perf_counter()
            assert ckpt.save(i + 1, state, data_position={"step": i + 1})
            t1 = time.perf_counter()
            ckpt.wait_until_finished()
            t2 = time.perf_counter()
            if i:
                blocked.append(t1 - t0)
                total.append(t2 - t0)
            note = f"blocked {(t1 - t0) * 1e3:.0f} ms, {mib / (t2 - t0):.0f} MiB/s written" if i else "warm-up"
            tick(bar, 1, f"{'async' if async_save else 'sync'}: {note}")   # the write has finished; untimed
    return blocked, total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed saves per mode (after one warm-up)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    try:
        state = student_state()
        n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        n_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
        print(f"state: {n_params / 1e6:.1f} M parameters + Adam moments = {n_bytes / 2**20:.0f} MiB "
              f"on {jax.device_count()} x {jax.devices()[0].device_kind}")
        bar = progress(2 * (args.repeats + 1), "bench_checkpoint", unit="save")
        a_blocked, a_total = bench(root / "async", state, True, args.repeats, bar, n_bytes / 2**20)
        s_blocked, _ = bench(root / "sync", state, False, args.repeats, bar, n_bytes / 2**20)
        bar.close()
        a, s = statistics.median(a_blocked), statistics.median(s_blocked)
        print(f"async save: loop blocked {a * 1e3:8.1f} ms (median of {args.repeats}; "
              f"write finished after {statistics.median(a_total) * 1e3:.0f} ms in the background)")
        print(f"sync save:  loop blocked {s * 1e3:8.1f} ms (median of {args.repeats})")
        print(f"ratio sync / async blocked time: {s / a:.1f}x")
        step_dir = max((root / "sync").glob("[0-9]*"), key=lambda p: int(p.name))
        t0 = time.perf_counter()
        write_manifest(step_dir)
        t1 = time.perf_counter()
        verify_step_dir(step_dir, full=True)
        t2 = time.perf_counter()
        print(f"of which the manifest (CRC-32 of every file, in the background): {(t1 - t0) * 1e3:.0f} ms; "
              f"checking it at restore: {(t2 - t1) * 1e3:.0f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
