"""Launch N local JAX processes that form one `jax.distributed` job on localhost (tests of multi-host code on CPU).

Each process gets its own environment: JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES, JAX_PROCESS_ID
(what `dwjax.mesh.initialize_distributed()` reads), JAX_PLATFORMS=cpu, gloo CPU collectives, and
XLA_FLAGS=--xla_force_host_platform_device_count=D (replacing the device count the pytest process set in
conftest.py). Output goes to one log file per process (no pipe can fill up and block a process).

    from tests.multiprocess import run, python_argv
    results = run(python_argv("import jax; print(jax.device_count())"), num_processes=2, local_devices=2)
    assert all(r.returncode == 0 for r in results)   # run() raises with every log when one fails

    group = start([sys.executable, "-m", "dwjax", "pseudo-label", ...], num_processes=2, local_devices=2)
    ...; group.kill()                                # SIGKILL to every process still running

`python_argv(code)` wraps a snippet so it calls `initialize_distributed()` before the code runs. Pass
`compilation_cache=DIR` to share XLA's persistent compilation cache between runs (compiles once per shape).
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

_BOOTSTRAP = "from dwjax.mesh import initialize_distributed as _init; _init()\n"


def free_port() -> int:
    """A TCP port on localhost nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, local_devices: int = 1,
                base: Optional[Mapping[str, str]] = None, extra: Optional[Mapping[str, str]] = None,
                compilation_cache: Optional[str | os.PathLike] = None) -> dict[str, str]:
    """The environment of process `process_id` of `num_processes` with `local_devices` fake CPU devices."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
    env.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
    })
    if num_processes > 1:
        env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes),
                    "JAX_PROCESS_ID": str(process_id)})
    else:  # a single process must not try to join a job
        for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "DWJAX_DISTRIBUTED"):
            env.pop(key, None)
    if compilation_cache is not None:
        env.update({"JAX_COMPILATION_CACHE_DIR": str(compilation_cache),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"})
    if extra:
        env.update(extra)
    return env


def python_argv(code: str) -> list[str]:
    """argv running `code` in a fresh interpreter after `initialize_distributed()`."""
    return [sys.executable, "-c", _BOOTSTRAP + code]


def dwjax_argv(*args: str) -> list[str]:
    """argv of a `dwjax` command run with this interpreter."""
    return [sys.executable, "-m", "dwjax", *map(str, args)]


@dataclasses.dataclass
class Result:
    process_id: int
    returncode: Optional[int]        # None: still running (killed by a timeout)
    output: str                      # stdout and stderr together

    def __str__(self) -> str:
        return f"--- process {self.process_id} (exit {self.returncode}) ---\n{self.output}"


class ProcessGroup:
    """Running processes of one job; `wait()` collects them, `kill()` sends SIGKILL to those still alive."""

    def __init__(self, procs: list[subprocess.Popen], logs: list[Path]):
        self.procs, self.logs = procs, logs

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def output(self, i: int) -> str:
        try:
            return self.logs[i].read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def results(self) -> list[Result]:
        return [Result(i, p.poll(), self.output(i)) for i, p in enumerate(self.procs)]

    def wait(self, timeout: float = 600, check: bool = True) -> list[Result]:
        """Wait for all; on a timeout, or when one fails while others hang in a collective, kill the rest.
        With `check`, raise AssertionError holding every process's output unless all exited 0."""
        deadline = time.monotonic() + timeout
        failed_at = None
        while self.alive():
            if time.monotonic() > deadline:
                break
            codes = [p.poll() for p in self.procs]
            if any(c not in (None, 0) for c in codes):
                failed_at = failed_at or time.monotonic()
                if time.monotonic() - failed_at > 10:   # give the others a moment to report, then stop them
                    break
            time.sleep(0.05)
        timed_out = self.alive()
        self.kill()
        results = self.results()
        if check and (timed_out or any(r.returncode != 0 for r in results)):
            why = f"timed out after {timeout:.0f} s" if timed_out and failed_at is None else "failed"
            raise AssertionError(f"multi-process job {why}:\n" + "\n".join(map(str, results)))
        return results

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def start(argv: Sequence[str], num_processes: int, local_devices: int = 1, cwd=None,
          env: Optional[Mapping[str, str]] = None, log_dir=None,
          compilation_cache: Optional[str | os.PathLike] = None) -> ProcessGroup:
    """Start `argv` as `num_processes` processes of one JAX job, each with `local_devices` CPU devices.
    `env` adds variables to every process's environment."""
    port = free_port()
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="dwjax-mp-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i in range(num_processes):
        log = log_dir / f"process-{i:03d}-{port}.log"
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(
                list(argv), cwd=str(cwd or REPO), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=process_env(i, num_processes, port, local_devices, extra=env,
                                compilation_cache=compilation_cache)))
        logs.append(log)
    return ProcessGroup(procs, logs)


def run(argv: Sequence[str], num_processes: int, local_devices: int = 1, timeout: float = 600,
        check: bool = True, **kw) -> list[Result]:
    """`start` then `wait`: the results of every process (raises unless all exit 0, when `check`)."""
    return start(argv, num_processes, local_devices, **kw).wait(timeout=timeout, check=check)
