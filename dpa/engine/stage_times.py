"""Where a training stage's wall-clock time goes, recorded in its manifest.

``seconds`` in a stage's manifest splits the run that finished it into
``setup`` (building the Runner: loading or converting the checkpoints, the
model, the optimizer), ``steps`` (the training loop, data loading and the
frozen tower's features included), ``checkpoints`` (writing them and their
checksums) and ``artifact`` (the stage's output, the final model's exports
included); ``total`` is their sum. The run summary prints them, so every run
is its own profile. A resumed stage records the run that finished it.
"""
import functools
import time
from typing import Dict, List

from dpa.engine.hooks import DPAHook


class StageClock:
    """Seconds spent in named phases; :meth:`timed` wraps a callable so
    that each call's time is added to a phase."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def timed(self, phase: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)
        return wrapper

    def stage_seconds(self, train_seconds: float) -> Dict[str, float]:
        """The manifest's ``seconds``: ``train_seconds`` (``runner.train()``
        as a whole) less its checkpoints and artifact is ``steps``."""
        within = self.seconds.get('checkpoints', 0.0) + self.seconds.get('artifact', 0.0)
        phases = dict(setup=self.seconds.get('setup', 0.0),
                      steps=max(train_seconds - within, 0.0),
                      checkpoints=self.seconds.get('checkpoints', 0.0),
                      artifact=self.seconds.get('artifact', 0.0))
        phases = {name: round(value, 3) for name, value in phases.items()}
        phases['total'] = round(sum(phases.values()), 3)
        return phases


def time_runner(runner, clock: StageClock) -> None:
    """Time the Runner's checkpoint writes and the hooks' ``after_train``
    (where :class:`dpa.engine.hooks.DPAHook` writes the artifact)."""
    runner.save_checkpoint = clock.timed('checkpoints', runner.save_checkpoint)
    for hook in runner.hooks:
        if isinstance(hook, DPAHook):
            hook.after_train = clock.timed('artifact', hook.after_train)


def format_duration(seconds: float) -> str:
    """``3 s``, ``2 min 5 s``, ``1 h 2 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds} s'
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f'{minutes} min {seconds} s'
    hours, minutes = divmod(minutes, 60)
    return f'{hours} h {minutes} min'


def seconds_line(seconds: Dict[str, float]) -> List[str]:
    """The summary's line for a manifest's ``seconds`` (none if absent):
    the total, then its phases when there are several."""
    if not seconds:
        return []
    phases = [(name, value) for name, value in seconds.items() if name != 'total']
    line = f"           time {format_duration(seconds['total'])}"
    if len(phases) > 1:
        line += ': ' + ', '.join(f'{name} {format_duration(value)}' for name, value in phases)
    return [line]
