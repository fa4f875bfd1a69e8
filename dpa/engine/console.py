"""What a training run shows on the console.

By default: one line when a stage starts (samples, batch arithmetic,
iterations, its log file), a progress bar per stage (iterations, ETA, loss,
CMO weight mean, skipped rows) when stdout is a terminal, else a plain line
every ``interval`` iterations (CI, Slurm logs), and warnings. Everything
mmengine logs (environment, resolved config, hook table, iteration records)
still goes to the stage's log file, ``<work_dir>/<stage>/<timestamp>/<timestamp>.log``;
``verbose`` prints it on the console too, as mmengine does.

Known-harmless messages of the libraries are dropped by message where they
arise, a stage's build and run (:func:`stage_console`), not process-wide.
"""
import contextlib
import datetime
import io
import logging
import os.path as osp
import re
import sys
import time
import warnings
from typing import Iterator, Optional, Sequence

from mmengine.dist import is_main_process
from mmengine.hooks import Hook

# (category, message pattern) of Python warnings that say nothing about this run.
HARMLESS_WARNINGS = (
    # peft reads transformers' deprecated `is_gradient_checkpointing` when it
    # wraps the LLM in LoRA.
    (FutureWarning, r'`is_gradient_checkpointing` is deprecated'),
)
# With gradient accumulation the scheduler steps every micro-iteration and the
# optimizer every `accumulation`-th, so torch's check sees a scheduler step
# first. WarmupCosineLR counts micro-iterations (the lr is constant within an
# optimizer step), so no value of the schedule is skipped.
SCHEDULER_BEFORE_OPTIMIZER = r'Detected call of `scheduler\.step\(\)` before `optimizer\.step\(\)`'
# mmengine's CheckpointHook builds a FileClient, which announces its own
# deprecation; a stage of several epochs runs as one iteration loop, whose
# data loader restarting (with the next epoch's sampler seed) is the next epoch.
HARMLESS_MMENGINE_RECORDS = (r'"FileClient" will be deprecated',
                             r'"HardDiskBackend" is the alias of "LocalBackend"',
                             r'Reach the end of the dataloader, it will be restarted')
# mmengine's INFO records that the console keeps: where a resumed stage restarts.
CONSOLE_INFO_RECORDS = (r'^resumed epoch: \d+, iter: \d+', )
# The registry's torchvision does not load beside a CPU-only torch: the image
# processors' PIL versions are the ones training uses there.
HARMLESS_TRANSFORMERS_RECORDS = {
    'transformers.utils.import_utils': (r'requires torchvision \(not installed\); falling back', ),
}


class MessageFilter(logging.Filter):
    """Drops log records whose message matches one of ``patterns``."""

    def __init__(self, patterns: Sequence[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def matches(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return any(p.search(message) for p in self.patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.matches(record)


class WarningsAndFilter(MessageFilter):
    """Keeps warnings, errors and the records matching ``patterns``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self.matches(record)


@contextlib.contextmanager
def stage_console(verbose: bool = False, accumulation: int = 1) -> Iterator[None]:
    """Around a stage's build and run: drop the known-harmless warnings and
    (unless ``verbose``) transformers' own progress bars (shard writing).

    Args:
        verbose: keep transformers' progress bars.
        accumulation: the stage's micro-batches per optimizer step; above 1 the
            scheduler-before-optimizer warning is expected and dropped.
    """
    from transformers.utils import logging as hf_logging
    filters = []
    for name, patterns in HARMLESS_TRANSFORMERS_RECORDS.items():
        filters.append((logging.getLogger(name), MessageFilter(patterns)))
    bars_were_on = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        for category, pattern in HARMLESS_WARNINGS:
            warnings.filterwarnings('ignore', message=pattern, category=category)
        if accumulation > 1:
            warnings.filterwarnings('ignore', message=SCHEDULER_BEFORE_OPTIMIZER,
                                    category=UserWarning)
        for logger, record_filter in filters:
            logger.addFilter(record_filter)
        if not verbose:
            hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            for logger, record_filter in filters:
                logger.removeFilter(record_filter)
            if bars_were_on and not verbose:
                hf_logging.enable_progress_bar()


# How mmengine's console handler starts a record: `<date> <time> - <logger> - <LEVEL> - `.
_RECORD_START = re.compile(r'^\S+ \S+ - \S+ - (\w+) - ')
_ANSI = re.compile(r'\x1b\[[0-9;]*m')


class _Writes(io.StringIO):
    """A stdout that keeps each write: a logging handler writes a record at once."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _replay(writes: Sequence[str], harmless: MessageFilter) -> None:
    """What was printed while the Runner was built, less mmengine's INFO and
    DEBUG records and the known-harmless warnings."""
    for text in writes:
        plain = _ANSI.sub('', text)
        record = _RECORD_START.match(plain)
        if record and (record.group(1) in ('INFO', 'DEBUG')
                       or any(p.search(plain) for p in harmless.patterns)):
            continue
        sys.stdout.write(text)
    sys.stdout.flush()


def _console_handlers(logger) -> list:
    return [h for h in logger.handlers
            if type(h) is logging.StreamHandler]  # FileHandler subclasses StreamHandler


def build_with_console(build, runner_cfg, verbose: bool = False):
    """``build(runner_cfg)``, the stage's Runner, with its console output routed.

    mmengine's logger prints the environment, the resolved config and the hook
    table while the Runner is being built, through a handler on the stdout of
    that moment; unless ``verbose``, that stdout keeps what is written, and
    after the build all of it but the INFO records (which are in the log file)
    is printed; from then on the handler prints warnings, errors and where a
    resumed stage restarts only. Known-harmless mmengine warnings never reach
    the console.
    """
    harmless = MessageFilter(HARMLESS_MMENGINE_RECORDS)
    if verbose:
        runner = build(runner_cfg)
    else:
        written = _Writes()
        try:
            with contextlib.redirect_stdout(written):
                runner = build(runner_cfg)
        finally:
            _replay(written.writes, harmless)
    for handler in _console_handlers(runner.logger):
        handler.addFilter(harmless)
        if not verbose:
            handler.setStream(sys.stdout)
            handler.addFilter(WarningsAndFilter(CONSOLE_INFO_RECORDS))
    return runner


def log_file(runner) -> str:
    """The stage's mmengine log file."""
    return osp.join(runner.log_dir, f'{runner.timestamp}.log')


def announce(runner, text: str, verbose: bool = False) -> None:
    """``text`` in the log file, and on the console once (main process)."""
    runner.logger.info(text)
    if not verbose and is_main_process():
        print(text, flush=True)


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ConsoleProgressHook(Hook):
    """A stage's progress on the main process: a tqdm bar when the stream is a
    terminal, else a plain line every ``interval`` iterations and at the last.

    Shown: iterations, ETA, the loss and CMO weight mean (means over the last
    ``interval`` iterations, as mmengine's log lines) and the skipped data rows.

    Args:
        stage: the stage's name, the bar's label.
        interval: iterations between plain lines (and the averaging window).
        stream: where to write; default ``sys.stdout`` when training starts.
    """
    priority = 'VERY_LOW'  # after DPAHook has published the skipped-row count

    def __init__(self, stage: str, interval: int = 10, stream=None):
        if interval < 1:
            raise ValueError(f'interval must be a positive number of iterations, got {interval}')
        self.stage, self.interval, self.stream = stage, interval, stream
        self.bar = None

    def before_train(self, runner):
        self.out = self.stream or sys.stdout
        self.total = runner.max_iters
        self.first = runner.iter  # a resumed stage starts past 0
        self.started = time.monotonic()
        self.bar = None
        if is_main_process() and self.out.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.first, desc=self.stage, file=self.out,
                            unit='it', dynamic_ncols=True, leave=True)

    def fields(self, runner) -> dict:
        """The shown values, by label."""
        scalars = runner.message_hub.log_scalars
        shown = {}
        if 'train/loss' in scalars:
            shown['loss'] = f"{scalars['train/loss'].mean(self.interval):.4f}"
        if 'train/cmo_w_mean' in scalars:
            shown['CMO w'] = f"{scalars['train/cmo_w_mean'].mean(self.interval):.3f}"
        if 'train/skipped_rows' in scalars:
            shown['skipped'] = f"{int(scalars['train/skipped_rows'].current())}"
        return shown

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not is_main_process():
            return
        done = runner.iter + 1
        if self.bar is not None:
            self.bar.set_postfix(self.fields(runner), refresh=False)
            self.bar.update(1)
            return
        if done % self.interval and done != self.total:
            return
        rate = (time.monotonic() - self.started) / max(done - self.first, 1)
        shown = '  '.join(f'{k} {v}' for k, v in self.fields(runner).items())
        # mmengine's `Iter(train) [i/n]`, so that whatever reads the log lines
        # of a Slurm job for it still finds them.
        width = len(str(self.total))
        print(f'[{self.stage}] Iter(train) [{done:>{width}}/{self.total}]  '
              f'eta {_eta(rate * (self.total - done))}  {shown}', file=self.out, flush=True)

    def after_train(self, runner):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def stage_start_line(stage: str, samples: int, batch_size: int, processes: int,
                     accumulation: int, global_batch: int, iterations: int,
                     log_path: Optional[str] = None) -> str:
    """The line that opens a stage on the console."""
    line = (f'[{stage}] {samples} samples, batch {batch_size} x {processes} processes x '
            f'{accumulation} accumulation = global batch {global_batch}; {iterations} iterations')
    return f'{line}; log: {log_path}' if log_path else line
