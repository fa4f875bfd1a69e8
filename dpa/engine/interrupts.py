"""SIGTERM / SIGINT during a stage: finish the optimizer step in progress,
save a checkpoint, and stop with the command that resumes.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM before killing a
job; a stage that reacts by saving loses minutes, not hours."""
import contextlib
import os.path as osp
import signal
from typing import Optional

import torch
from mmengine.dataset import worker_init_fn as seed_worker
from mmengine.dist import all_reduce, get_rank, get_world_size
from mmengine.hooks import Hook

from dpa.registry import FUNCTIONS, HOOKS

_requested = {'signal': None}


def requested_signal() -> Optional[int]:
    return _requested['signal']


class TrainingInterrupted(RuntimeError):
    """A stage stopped on a signal after saving ``checkpoint``."""

    def __init__(self, stage: str, signum: int, iteration: int, checkpoint: Optional[str]):
        self.stage, self.signum = stage, signum
        self.iteration, self.checkpoint = iteration, checkpoint
        name = signal.Signals(signum).name
        if checkpoint is None and not iteration:
            super().__init__(f'stage {stage!r} interrupted by {name} before it saved anything')
        else:
            super().__init__(f'stage {stage!r} interrupted by {name} after iteration '
                             f'{iteration}; checkpoint: {checkpoint}')


@contextlib.contextmanager
def graceful_interrupts():
    """Turn SIGINT and SIGTERM into a request the training loop honours at the
    next step boundary; a second SIGINT interrupts at once."""
    def request(signum, frame):
        if signum == signal.SIGINT and _requested['signal'] is not None:
            raise KeyboardInterrupt
        _requested['signal'] = signum

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    _requested['signal'] = None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested['signal'] = None


@FUNCTIONS.register_module()
def signal_safe_worker_init(worker_id: int, num_workers: int, seed: int):
    """DataLoader worker set-up: mmengine's seeding, and no reaction to SIGINT or
    SIGTERM, which a terminal or a scheduler sends the whole process group: the
    workers keep feeding the main process until it has saved its checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed_worker(worker_id, num_workers, get_rank(), seed)


def stop_dataloader_workers(runner) -> None:
    """Shut the training DataLoader's workers down now. They ignore SIGTERM
    (above), so they must not be left for multiprocessing's exit handler, which
    stops daemonic children with SIGTERM and then waits for them."""
    loop = runner._train_loop
    iterator = getattr(getattr(loop, 'dataloader_iterator', None), '_iterator', None)
    shutdown = getattr(iterator, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()


@HOOKS.register_module()
class GracefulExitHook(Hook):
    """Stops training at the first optimizer-step boundary after a signal,
    with a checkpoint of that iteration (so a resumed run is exact).

    Args:
        stage: the stage's name, for the message.
        accumulation: micro-batches per optimizer step.
    """
    priority = 'LOWEST'  # after CheckpointHook, which may have just saved

    def __init__(self, stage: str, accumulation: int = 1):
        self.stage, self.accumulation = stage, accumulation

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        signum = _requested['signal'] or 0
        if get_world_size() > 1:
            flag = torch.tensor(float(signum))
            all_reduce(flag, op='max')
            signum = int(flag.item())
        done = runner.iter + 1
        # The last iteration is let finish: the stage then writes its artifact.
        if not signum or done % self.accumulation or done == runner.max_iters:
            return
        filename = f'iter_{done}.pth'
        if not osp.exists(osp.join(runner.work_dir, filename)):
            runner.save_checkpoint(runner.work_dir, filename, by_epoch=False)
        raise TrainingInterrupted(self.stage, signum, done, osp.join(runner.work_dir, filename))
