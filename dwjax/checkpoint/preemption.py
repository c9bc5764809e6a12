"""Preemption: SIGTERM sets a flag, and `should_stop(step)` tells every process the same answer for the same step
(JAX's preemption sync point where its service runs, else an all-gather of every process's flag)."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

#: set by the signal handler or `request_stop`, read by `should_stop`
_STOP = threading.Event()


def _preemption_service_active() -> bool:
    """Whether JAX's multi-process preemption sync manager runs (it handles SIGTERM itself): `jax.distributed`
    starts it in `initialize` unless `jax_enable_preemption_service` is off."""
    return (jax.process_count() > 1 and jax.distributed.is_initialized()
            and bool(jax.config.jax_enable_preemption_service))


def install_preemption_handler(signals=(signal.SIGTERM,)) -> Callable[[], None]:
    """Make `signals` (default SIGTERM) set the flag `should_stop` reads; returns a function restoring the old handlers.

    A Python handler that was installed before keeps being called. Where JAX's multi-process preemption service
    runs, it already catches SIGTERM and agrees on a step across processes: no handler is installed then, and
    `should_stop(step)` asks the sync point. Call from the main thread.
    """
    if _preemption_service_active():
        log.info("JAX preemption service active: SIGTERM is handled by its sync point")
        return lambda: None
    installed: dict[int, Any] = {}

    def handler(signum, frame):
        _STOP.set()
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        previous = installed.get(signum)
        if callable(previous):
            previous(signum, frame)

    for sig in signals:
        installed[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, previous in installed.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    return restore


def request_stop() -> None:
    """Set the stop flag as SIGTERM would (e.g. from a time limit)."""
    _STOP.set()


def reset_stop() -> None:
    """Clear the stop flag."""
    _STOP.clear()


def should_stop(step: int | None = None) -> bool:
    """Whether the loop should save now and exit. All processes get the same answer for the same step.

    Multi-process: call it on every process at every step (it is a sync point or a small collective)."""
    local = _STOP.is_set()
    if jax.process_count() == 1:
        return local
    if _preemption_service_active() and step is not None:
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step)) or local
        except RuntimeError:  # the service was disabled after all
            pass
    flags = multihost_utils.process_allgather(np.array([local], np.int32))
    return bool(np.any(flags))
