"""Running a stage on many processes: the world size before the process
group exists, the process group of CPU runs, and the runner and wrapper of
each strategy.

Strategies (``_base_/strategies/``):

- no ``strategy`` key (default): mmengine's ``Runner``; under a launcher the
  model is wrapped in DDP. ``mixed_precision='bfloat16'`` trains under bf16
  autocast (``AmpOptimWrapper``).
- ``strategy=dict(type='DeepSpeedStrategy', ...)``: mmengine's
  ``FlexibleRunner``; the stage's gradient accumulation, gradient clipping
  and mixed precision move into the DeepSpeed config.
- ``strategy=dict(type='FSDPStrategy', ...)``: ``FlexibleRunner``; mixed
  precision becomes FSDP's ``MixedPrecision``.
"""
import copy
import os

import torch
import torch.distributed as dist
from mmengine.registry import RUNNERS

from dpa.engine.errors import ConfigError

# Where each launcher announces the number of processes before init.
WORLD_SIZE_VARIABLES = {'pytorch': 'WORLD_SIZE', 'slurm': 'SLURM_NTASKS',
                        'mpi': 'OMPI_COMM_WORLD_SIZE'}
STRATEGIES = ('DeepSpeedStrategy', 'FSDPStrategy')
PRECISIONS = (None, 'bfloat16', 'float16')


def world_size(launcher: str) -> int:
    """Number of training processes, read from the launcher's environment
    (the process group does not exist yet when the config is checked)."""
    if launcher == 'none':
        return 1
    if launcher not in WORLD_SIZE_VARIABLES:
        raise ConfigError(f'launcher={launcher!r}: choose among none, '
                          f'{", ".join(WORLD_SIZE_VARIABLES)}')
    return int(os.environ.get(WORLD_SIZE_VARIABLES[launcher], 1))


def check_strategy(cfg) -> None:
    strategy, precision = cfg.get('strategy'), cfg.get('mixed_precision')
    if strategy is not None and strategy.get('type') not in STRATEGIES:
        raise ConfigError(f"strategy.type={strategy.get('type')!r}: choose among {STRATEGIES}, "
                          'or leave `strategy` out for DDP')
    if precision not in PRECISIONS:
        raise ConfigError(f'mixed_precision={precision!r}: choose among {PRECISIONS}')
    if strategy is not None and shards_parameters(strategy):
        # Refused up front: training would run to the end and then write
        # incomplete artifacts.
        raise ConfigError(
            f"strategy={strategy.get('type')} with sharded parameters (ZeRO-3 or FSDP): each "
            "stage writes its artifact (LoRA adapter, projector, final model) from rank 0's "
            'parameters, and gathering sharded ones is not implemented yet (docs/distributed.md, '
            "'Known gaps'). Use configs/_base_/strategies/deepspeed_zero2.py, or DDP (no "
            '`strategy`)')


def shards_parameters(strategy) -> bool:
    """Whether the strategy splits the parameters themselves across ranks."""
    if strategy.get('type') == 'FSDPStrategy':
        return True
    return (strategy.get('zero_optimization') or {}).get('stage', 0) == 3


def init_cpu_process_group(cfg) -> None:
    """Join the torchrun process group with gloo on a machine without a GPU.

    mmengine's ``pytorch`` launcher calls ``torch.cuda.set_device``, which a
    CPU build of torch cannot; once the group exists the Runner skips its own
    initialisation.
    """
    if (cfg.get('launcher', 'none') == 'pytorch' and not torch.cuda.is_available()
            and not dist.is_initialized()):
        dist.init_process_group(backend='gloo')


def close_process_group() -> None:
    """Leave the process group once every rank is done.

    A group left to interpreter exit can abort the process ("terminate called
    without an active exception" from gloo's threads) after training succeeded.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def apply_strategy(runner_cfg: dict, cfg, stage: str, accumulation: int) -> dict:
    """Adapt one stage's Runner config to the config's strategy, in place.

    Args:
        runner_cfg: the stage's mmengine Runner config (plain dict).
        cfg: the pipeline config (``strategy``, ``mixed_precision``, ``launcher``).
        stage: the stage's name.
        accumulation: the stage's derived gradient accumulation.
    """
    strategy = copy.deepcopy(cfg.get('strategy'))
    precision = cfg.get('mixed_precision')
    optim_wrapper = runner_cfg['optim_wrapper']
    if strategy is None:
        # A text-only batch leaves the projector out of stage 3's graph.
        runner_cfg['find_unused_parameters'] = stage == 'finetune'
        if cfg.get('launcher', 'none') != 'none' and not torch.cuda.is_available():
            runner_cfg['model_wrapper_cfg'] = dict(
                type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
                find_unused_parameters=runner_cfg['find_unused_parameters'])
        if precision is not None:
            optim_wrapper.update(type='AmpOptimWrapper', dtype=precision)
        return runner_cfg

    runner_cfg['runner_type'] = 'FlexibleRunner'
    if strategy['type'] == 'DeepSpeedStrategy':
        strategy['gradient_accumulation_steps'] = accumulation
        clip_grad = optim_wrapper.get('clip_grad')
        if clip_grad:
            strategy['gradient_clipping'] = clip_grad['max_norm']
        if precision is not None:
            strategy['bf16' if precision == 'bfloat16' else 'fp16'] = dict(enabled=True)
        # DeepSpeed owns accumulation, clipping and precision.
        runner_cfg['optim_wrapper'] = dict(type='DeepSpeedOptimWrapper',
                                           optimizer=optim_wrapper['optimizer'])
    else:
        if precision is not None:
            strategy.setdefault('model_wrapper', {})['mixed_precision'] = dict(
                param_dtype=precision, reduce_dtype='float32', buffer_dtype=precision)
    runner_cfg['strategy'] = strategy
    return runner_cfg


def build_runner(runner_cfg):
    """A ``Runner`` or, for the strategies that need one, a ``FlexibleRunner``."""
    return RUNNERS.build(runner_cfg)
