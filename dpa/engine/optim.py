"""Optimizer wrappers that refuse to step on a non-finite loss: a NaN that
reaches the weights poisons every later step, and the run looks alive."""
import contextlib
import math

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.optim import AmpOptimWrapper, DefaultOptimWrapperConstructor, OptimWrapper

from dpa.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS


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


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ProjectorLrConstructor(DefaultOptimWrapperConstructor):
    """Two parameter groups, as LLaVA's trainer makes with ``mm_projector_lr``:
    the projector's at ``paramwise_cfg['projector_lr']``, every other
    trainable parameter (LoRA adapters, the LLM) at the optimizer's ``lr``.
    The schedule scales both alike (warm-up, cosine). Frozen parameters are
    left out of the optimizer.

    The projector is found by identity (``model.projector``, under a DDP or
    FSDP2 wrapper ``model.module.projector``), not by name.
    """

    def add_params(self, params, module, **kwargs):
        model = getattr(module, 'module', module)
        projector = {id(p) for p in model.projector.parameters()}
        trainable = [p for p in module.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in trainable if id(p) not in projector]),
                  dict(params=[p for p in trainable if id(p) in projector],
                       lr=self.paramwise_cfg['projector_lr'])]
        params.extend(group for group in groups if group['params'])


def _number_problem(value, low=None, high=None, low_open=False, high_open=False):
    """Why ``value`` is not a finite real number in the range, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f'a number is required, got {value!r} ({type(value).__name__})'
    if not math.isfinite(value):
        return f'got {value!r}, a finite number is required'
    if low is not None and (value <= low if low_open else value < low):
        return f'got {value!r}, it must be {">" if low_open else ">="} {low}'
    if high is not None and (value >= high if high_open else value > high):
        return f'got {value!r}, it must be {"<" if high_open else "<="} {high}'
    return None


# The optimizer settings checked, with their range: (low, high, low_open, high_open).
OPTIMIZER_RANGES = {'lr': (0, None, True, False), 'weight_decay': (0, None, False, False),
                    'eps': (0, None, True, False), 'momentum': (0, 1, False, False)}
OPTIMIZER_FIXES = {
    'lr': 'a positive learning rate such as 2e-5',
    'weight_decay': '0 (none) or a small positive value such as 0.01',
    'eps': 'a small positive value such as 1e-8',
    'momentum': 'a value in [0, 1] such as 0.9',
    'betas': 'two values in [0, 1) such as (0.9, 0.999)',
    'max_norm': 'a positive gradient norm such as 1.0',
}


def optimizer_problems(optim_wrapper: dict, prefix: str):
    """``(key, problem, fix)`` for each numeric setting of an optimizer wrapper
    config (``lr``, ``betas``, ``weight_decay``, ``eps``, ``momentum``,
    ``clip_grad.max_norm``) a training step cannot use: a NaN, a negative
    rate, a beta outside [0, 1), a string. ``prefix`` names the wrapper in
    the keys (``align.optim_wrapper``)."""
    optimizer = (optim_wrapper or {}).get('optimizer') or {}
    for key, (low, high, low_open, high_open) in OPTIMIZER_RANGES.items():
        if key in optimizer:
            problem = _number_problem(optimizer[key], low, high, low_open, high_open)
            if problem:
                yield f'{prefix}.optimizer.{key}', problem, OPTIMIZER_FIXES[key]
    if 'betas' in optimizer:
        betas = optimizer['betas']
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            yield (f'{prefix}.optimizer.betas', f'got {betas!r}, a pair is required',
                   OPTIMIZER_FIXES['betas'])
        else:
            for beta in betas:
                problem = _number_problem(beta, 0, 1, high_open=True)
                if problem:
                    yield f'{prefix}.optimizer.betas', problem, OPTIMIZER_FIXES['betas']
                    break
    clip = (optim_wrapper or {}).get('clip_grad') or {}
    if 'max_norm' in clip:
        problem = _number_problem(clip['max_norm'], 0, low_open=True)
        if problem:
            yield f'{prefix}.clip_grad.max_norm', problem, OPTIMIZER_FIXES['max_norm']


GUARDED = {'OptimWrapper': 'GuardedOptimWrapper', 'AmpOptimWrapper': 'GuardedAmpOptimWrapper'}
