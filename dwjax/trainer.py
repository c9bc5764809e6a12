"""The training loop: a pure, jitted step over a batch stream, and hooks that run every N steps.

    trainer = Trainer(step_fn, total_steps, progress, should_stop)
    trainer.add_hook(fn, every=N)        # fn(info: StepInfo) after steps N, 2N, ... and after the last step
    state, info = trainer.run(state, batches, start_step, to_device)

Levanter's `Trainer.add_hook(every=N)` is the model. The loop owns only what every training run shares: feeding
the step, counting *finished* steps on the progress bar (`Progress`: a step counts once its loss is on hand),
the preemption check, and calling the hooks in the order they were added. Everything a run wants around the
step (metrics, evaluation, checkpoints, the batch log) is a hook; `dwjax/distill.py` adds them. A hook that needs
what an earlier hook of the same step produced (the checkpoint ranks by the evaluation's WER) reads it from
`info.results`, which is fresh at every step.

`every=0` runs a hook after the last step only; `every=1` after every step (such a hook may decide itself, e.g.
logging on the first step too). After a step at which a stop was requested (`should_stop(step)`, SIGTERM: see
dwjax/checkpoint/preemption.py) the hooks whose turn it is run, then the others that must see a stop (`on_stop=True`:
the checkpoint), and the loop ends.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Iterable, Optional

import jax

__all__ = ["Trainer", "StepInfo", "Progress"]


@dataclasses.dataclass
class StepInfo:
    step: int                 # optimizer steps finished
    state: Any                # the train state after this step (device arrays)
    metrics: dict             # this step's metrics (device arrays: jax.device_get them when needed)
    local: dict               # this process's batch as the loader gave it (host arrays: ids, audio_seconds, ...)
    final: bool               # the run's last step (total_steps)
    stop: bool                # a stop was requested at this step: the loop ends after its hooks
    results: dict = dataclasses.field(default_factory=dict)   # what earlier hooks of this step left for later ones


@dataclasses.dataclass
class _Hook:
    fn: Callable[[StepInfo], Any]
    every: int
    on_stop: bool

    def due(self, info: StepInfo) -> bool:
        return info.final or bool(self.every and info.step % self.every == 0) or (info.stop and self.on_stop)


class Progress:
    """The tqdm bar over *finished* steps. A step counts once its loss is on hand: `dispatched` keeps at most one
    step in flight (it waits for the one before, which the device has usually finished: the host still runs one
    step ahead), `poll` counts whatever is already done without waiting, `drain` waits for the rest. The postfix
    shows samples/s and audio-s/s of finished steps over the last `window` (tqdm's own rate is steps/s)."""

    def __init__(self, bar, samples_per_step: int, audio_scale: float = 1.0, window: int = 20):
        self.bar, self.samples_per_step, self.audio_scale = bar, samples_per_step, audio_scale
        self.pending = collections.deque()            # (loss array, audio seconds) of dispatched, uncounted steps
        self.recent = collections.deque(maxlen=window)  # (finish time, samples, audio seconds)
        self.info: dict[str, str] = {}
        self.finished = 0

    def dispatched(self, loss, audio_seconds: float) -> None:
        self.pending.append((loss, float(audio_seconds) * self.audio_scale))
        while len(self.pending) > 1:
            self._finish()

    def poll(self) -> None:
        while self.pending and _is_ready(self.pending[0][0]):
            self._finish()

    def drain(self) -> None:
        while self.pending:
            self._finish()

    def show(self, **info: str) -> None:
        self.info.update(info)
        self.bar.set_postfix(self.info, refresh=False)

    def _finish(self) -> None:
        loss, audio = self.pending.popleft()
        jax.block_until_ready(loss)
        self.recent.append((time.time(), self.samples_per_step, audio))
        self.finished += 1
        if len(self.recent) >= 2:                      # rates between finishes (the first step's compile excluded)
            dt = self.recent[-1][0] - self.recent[0][0]
            if dt > 0:
                later = list(self.recent)[1:]
                self.info["smp/s"] = f"{sum(r[1] for r in later) / dt:.2f}"
                self.info["audio-s/s"] = f"{sum(r[2] for r in later) / dt:.1f}"
                self.bar.set_postfix(self.info, refresh=False)
        self.bar.update(1)


def _is_ready(x) -> bool:
    try:
        return bool(x.is_ready())
    except AttributeError:                            # not a jax.Array (a host value): done
        return True


class Trainer:
    """`step_fn(state, batch) -> (state, metrics)` (pure and jitted: the teacher's parameters are closed over)
    for `total_steps` optimizer steps, with hooks (module docstring)."""

    def __init__(self, step_fn: Callable, total_steps: int, progress: Progress,
                 should_stop: Callable[[int], bool]):
        self.step_fn, self.total_steps = step_fn, total_steps
        self.progress, self.should_stop = progress, should_stop
        self.hooks: list[_Hook] = []

    def add_hook(self, fn: Callable[[StepInfo], Any], every: int = 1, on_stop: bool = False) -> None:
        """Run `fn(info)` after every `every`-th step (0: only after the last) and after the last step; with
        `on_stop` also after a step at which a stop was requested."""
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.hooks.append(_Hook(fn, int(every), bool(on_stop)))

    def run(self, state, batches: Iterable[tuple[int, dict]], start_step: int,
            to_device: Callable[[dict], dict]) -> tuple[Any, Optional[StepInfo]]:
        """Trains from `start_step` over `batches` ((step, this process's batch) pairs, from start_step on) until
        total_steps or a stop; returns the last state and the last step's StepInfo (None when no step ran)."""
        info = None
        if start_step >= self.total_steps:
            return state, info
        for step, local in batches:
            state, metrics = self.step_fn(state, to_device(local))
            step += 1
            self.progress.dispatched(metrics["loss"], local["audio_seconds"])
            info = StepInfo(step, state, metrics, local, final=step >= self.total_steps,
                            stop=self.should_stop(step))
            for hook in self.hooks:
                if hook.due(info):
                    hook.fn(info)
            self.progress.poll()
            if info.stop or info.final:
                break
        self.progress.drain()
        return state, info
