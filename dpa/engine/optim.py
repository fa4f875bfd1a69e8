"""Optimizer wrappers that refuse to step on a non-finite loss: a NaN that
reaches the weights poisons every later step, and the run looks alive."""
import contextlib

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from dpa.registry import OPTIM_WRAPPERS


class NonFiniteLossError(FloatingPointError):
    """The loss of a training step is NaN or infinite."""


class NonFiniteGuard:
    """Checks the loss before backward. With ``skip_nonfinite=True`` such a step
    contributes nothing (the optimizer still steps on what the other
    micro-batches of its accumulation window gathered) and is counted in
    ``skipped_steps``; otherwise :class:`NonFiniteLossError` is raised."""

    def __init__(self, *args, skip_nonfinite: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0

    def update_params(self, loss, step_kwargs=None, zero_kwargs=None):
        finite = torch.isfinite(loss.detach()).all().float()
        if get_world_size() > 1:
            # Every rank must agree, or DDP's gradient all-reduce would hang.
            all_reduce(finite, op='min')
        if finite.item():
            return super().update_params(loss, step_kwargs, zero_kwargs)
        if not self.skip_nonfinite:
            raise NonFiniteLossError(f'non-finite loss {loss.item()}')
        self.skipped_steps += 1
        self._inner_count += 1
        if self.should_update():
            self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))


@OPTIM_WRAPPERS.register_module()
class GuardedOptimWrapper(NonFiniteGuard, OptimWrapper):
    """mmengine's ``OptimWrapper`` with the non-finite loss guard."""


@OPTIM_WRAPPERS.register_module()
class GuardedAmpOptimWrapper(NonFiniteGuard, AmpOptimWrapper):
    """mmengine's ``AmpOptimWrapper`` (GPU mixed precision) with the guard."""


@OPTIM_WRAPPERS.register_module()
class GuardedAutocastOptimWrapper(NonFiniteGuard, OptimWrapper):
    """bf16 compute by ``torch.autocast`` over the parameters as they are held
    (float32 master weights when the pipeline holds trainable ones in float32,
    :mod:`dpa.engine.precision`), with the guard.

    mmengine's ``AmpOptimWrapper`` asserts a GPU; bf16 needs no loss scaling,
    so this wrapper runs the same path on a GPU and on a CPU, where the tests
    run it.

    Args:
        dtype: the autocast dtype; only ``'bfloat16'`` (float16 needs the loss
            scaling of ``AmpOptimWrapper``).
    """

    def __init__(self, *args, dtype: str = 'bfloat16', **kwargs):
        if dtype != 'bfloat16':
            raise ValueError(f'GuardedAutocastOptimWrapper: dtype={dtype!r}; only bfloat16 runs '
                             'without loss scaling (float16: GuardedAmpOptimWrapper)')
        super().__init__(*args, **kwargs)
        self.cast_dtype = torch.bfloat16

    @contextlib.contextmanager
    def optim_context(self, model):
        device = next(model.parameters()).device.type
        with super().optim_context(model), torch.autocast(device, dtype=self.cast_dtype):
            yield


GUARDED = {'OptimWrapper': 'GuardedOptimWrapper', 'AmpOptimWrapper': 'GuardedAmpOptimWrapper'}
