"""Training-loop pieces the recipes need beyond mmengine's stock ones."""
import logging
import math
from typing import Optional

from mmengine.logging import print_log

from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler
from mmengine.runner import IterBasedTrainLoop

from dpa.registry import LOOPS, PARAM_SCHEDULERS


@LOOPS.register_module()
class EpochsAsItersTrainLoop(IterBasedTrainLoop):
    """``max_epochs`` passes over the data, run as an iteration-based loop so
    that a resumed run skips exactly the batches already trained on (mmengine's
    epoch loop restarts the interrupted epoch)."""

    def __init__(self, runner, dataloader, max_epochs: int = 1, **kwargs):
        super().__init__(runner, dataloader, max_iters=1, **kwargs)
        self._max_epochs = max_epochs
        self._max_iters = max(1, len(self.dataloader) * max_epochs)

    @property
    def max_epochs(self):
        return self._max_epochs


def warmup_problem(steps: int, warmup_ratio: float) -> Optional[str]:
    """What is wrong when a run of ``steps`` optimizer steps never leaves its
    warm-up of ``ceil(warmup_ratio * steps)`` steps (the first at lr 0), else None."""
    warmup = math.ceil(warmup_ratio * steps)
    if steps > warmup:
        return None
    effect = ('its only step runs at lr 0: nothing trains' if steps == 1 else
              f'the lr rises from 0 to {(steps - 1) / warmup:.0%} of its base value and no higher')
    return (f'{steps} optimizer step(s), all within the warm-up of {warmup} (warmup_ratio '
            f'{warmup_ratio}): {effect}. Give it more data or epochs, a smaller global batch, '
            'or warmup_ratio=0')


@PARAM_SCHEDULERS.register_module()
class WarmupCosineLR(LRSchedulerMixin, _ParamScheduler):
    """Linear warm-up over ``warmup_ratio`` of the optimizer steps, then cosine
    decay to ``eta_min_ratio`` of the base lr: exactly transformers'
    ``get_cosine_schedule_with_warmup`` as its ``Trainer`` drives it (the
    reference recipe), with the warm-up length derived from the run's length
    so it holds for any data size.

    At optimizer step ``k`` of ``T`` (``T = ceil(iterations / accumulation)``,
    the steps mmengine's accumulating optimizer wrapper takes) the factor is
    ``k / W`` during the ``W = ceil(warmup_ratio * T)`` warm-up steps (the
    first step has lr 0, as in transformers), then
    ``0.5 * (1 + cos(pi * (k - W) / (T - W)))``. The scheduler steps every
    micro-iteration; micro-iteration ``i`` belongs to optimizer step
    ``i // accumulation``, so the lr is constant within a step.

    Use with ``by_epoch=True, begin=0, end=<epochs>, convert_to_iter_based=True``.

    Args:
        warmup_ratio: fraction of the optimizer steps spent warming up.
        eta_min_ratio: the lr at the end, as a fraction of the base lr.
        accumulation: micro-iterations per optimizer step (gradient accumulation).
    """

    def __init__(self, optimizer, warmup_ratio: float = 0.03, eta_min_ratio: float = 0.0,
                 accumulation: int = 1, begin: int = 0, end: int = INF, last_step: int = -1,
                 by_epoch: bool = True, verbose: bool = False):
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f'warmup_ratio must be in [0, 1), got {warmup_ratio}')
        if not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f'accumulation must be a positive integer, got {accumulation!r}')
        self.accumulation = accumulation
        self.total = math.ceil((end - begin) / accumulation)
        self.warmup = math.ceil(warmup_ratio * self.total)
        self.eta_min_ratio = eta_min_ratio
        problem = warmup_problem(self.total, warmup_ratio)
        if problem:
            print_log(f'learning-rate schedule: {problem}', logger='current',
                      level=logging.WARNING)
        super().__init__(optimizer, begin=begin, end=end, last_step=last_step,
                         by_epoch=by_epoch, verbose=verbose)

    @classmethod
    def build_iter_from_epoch(cls, *args, begin=0, end=INF, by_epoch=True, epoch_length=None,
                              **kwargs):
        return cls(*args, begin=int(begin * epoch_length), end=int(end * epoch_length),
                   by_epoch=False, **kwargs)

    def factor(self, iteration: int) -> float:
        """The lr factor of micro-iteration ``iteration``."""
        step = iteration // self.accumulation
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.eta_min_ratio + (1 - self.eta_min_ratio) * cosine

    def _get_value(self):
        return [group['initial_lr'] * self.factor(self.last_step) for group in
                self.optimizer.param_groups]
