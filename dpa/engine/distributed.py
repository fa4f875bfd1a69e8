"""Running a stage on many processes: the world size before the process
group exists, the process group of CPU runs, and the runner and wrapper of
each strategy.

Strategies (``_base_/strategies/``):

- no ``strategy`` key (default): mmengine's ``Runner``; under a launcher the
  model is wrapped in DDP. ``mixed_precision='bfloat16'`` trains under bf16
  autocast (``GuardedAutocastOptimWrapper``, any device).
- ``strategy=dict(type='FSDP2Strategy', ...)``: PyTorch FSDP2
  (:mod:`dpa.engine.fsdp`): ``FSDPRunner`` with ``FullyShardedModel``;
  ``mixed_precision='bfloat16'`` becomes FSDP2's ``MixedPrecisionPolicy``.
- ``strategy=dict(type='DeepSpeedStrategy', ...)``: mmengine's
  ``FlexibleRunner``; the stage's gradient accumulation, gradient clipping
  and mixed precision move into the DeepSpeed config.

Every strategy gets the config's ``trainable_dtype`` for the model
(:mod:`dpa.engine.precision`).
"""
import copy
import gc
import logging
import os
import sys

import torch
import torch.distributed as dist
from mmengine.registry import RUNNERS

from dpa.errors import ConfigError
from dpa.engine.fsdp import FSDPRunner

# Where each launcher announces the number of processes before init.
WORLD_SIZE_VARIABLES = {'pytorch': 'WORLD_SIZE', 'slurm': 'SLURM_NTASKS',
                        'mpi': 'OMPI_COMM_WORLD_SIZE'}
# What each launcher's process group is initialised from, and who sets it.
LAUNCHER_VARIABLES = {
    'pytorch': (('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'),
                'torchrun sets them: start it with tools/dist_train.sh CONFIG GPUS'),
    'slurm': (('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'),
              'srun sets them: start it with tools/slurm_train.sh PARTITION JOB CONFIG'),
    'mpi': (('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_RANK',
             'MASTER_ADDR'), 'mpirun (Open MPI) sets the OMPI_ ones; export MASTER_ADDR'),
}
STRATEGIES = ('DeepSpeedStrategy', 'FSDP2Strategy')
FSDP2_KEYS = ('type', 'reshard_after_forward')
PRECISIONS = (None, 'bfloat16', 'float16')
# The optimizer wrapper of each mixed precision under DDP or one process: bf16
# needs no loss scaling and runs on any device; fp16's scaler needs a GPU.
AUTOCAST = {'bfloat16': 'GuardedAutocastOptimWrapper', 'float16': 'GuardedAmpOptimWrapper'}


def world_size(launcher: str) -> int:
    """Number of training processes, read from the launcher's environment
    (the process group does not exist yet when the config is checked)."""
    if launcher == 'none':
        return 1
    if launcher not in WORLD_SIZE_VARIABLES:
        raise ConfigError(f'launcher={launcher!r}: choose among none, '
                          f'{", ".join(WORLD_SIZE_VARIABLES)}')
    return int(os.environ.get(WORLD_SIZE_VARIABLES[launcher], 1))


def check_launcher(launcher: str) -> None:
    """The environment a launcher's process group is made from is there
    (checked before a run starts, not by a dry run, which plans for any).

    Raises:
        ConfigError: naming the missing variables and the command that sets them.
    """
    if launcher == 'none':
        return
    if launcher not in LAUNCHER_VARIABLES:
        raise ConfigError(f'launcher={launcher!r}: choose among none, '
                          f'{", ".join(LAUNCHER_VARIABLES)}')
    names, how = LAUNCHER_VARIABLES[launcher]
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise ConfigError(f'--launcher {launcher}: this process was not started by the '
                          f'launcher (no {", ".join(missing)} in the environment); {how}, or '
                          'leave --launcher out to train in one process')


def check_strategy(cfg) -> None:
    strategy, precision = cfg.get('strategy'), cfg.get('mixed_precision')
    if strategy is not None and strategy.get('type') == 'FSDPStrategy':
        raise ConfigError("strategy.type='FSDPStrategy' (mmengine's FSDP1) is replaced by "
                          "'FSDP2Strategy': inherit configs/_base_/strategies/fsdp.py")
    if strategy is not None and strategy.get('type') not in STRATEGIES:
        raise ConfigError(f"strategy.type={strategy.get('type')!r}: choose among {STRATEGIES}, "
                          'or leave `strategy` out for DDP')
    if precision not in PRECISIONS:
        raise ConfigError(f'mixed_precision={precision!r}: choose among {PRECISIONS}')
    if strategy is not None and strategy['type'] == 'FSDP2Strategy':
        unknown = sorted(set(strategy) - set(FSDP2_KEYS))
        if unknown:
            raise ConfigError(f'strategy: FSDP2Strategy has no key(s) {unknown}; '
                              f'it takes {FSDP2_KEYS}')
        if precision == 'float16':
            raise ConfigError("mixed_precision='float16' under FSDP2Strategy needs a sharded "
                              "gradient scaler, which is not wired in: use 'bfloat16'")
    if strategy is not None and shards_parameters(strategy):
        # Refused up front: training would run to the end and then write
        # incomplete artifacts.
        raise ConfigError(
            'strategy=DeepSpeedStrategy with zero_optimization.stage=3: each stage writes its '
            "artifact (LoRA adapter, projector, final model) from rank 0's parameters, and "
            "gathering ZeRO-3's sharded ones (deepspeed.zero.GatheredParameters) is not "
            "implemented: it needs a GPU to be tested (docs/distributed.md, 'Known gaps'). "
            'Use configs/_base_/strategies/fsdp.py (FSDP2, sharded parameters, gathered '
            'artifacts) or deepspeed_zero2.py')


def shards_parameters(strategy) -> bool:
    """Whether a DeepSpeed strategy splits the parameters themselves across
    ranks (ZeRO-3); FSDP2 does too, and gathers them for the artifacts."""
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
    Models held in reference cycles (FSDP2's DTensors keep the group's mesh)
    are freed first, while the interpreter is whole.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def exit_distributed_run() -> None:
    """End a successful multi-process run: leave the group, then the process,
    without the interpreter's teardown.

    Even after ``destroy_process_group`` a rank of a two-process FSDP2 run on
    gloo aborted at exit now and then (SIGABRT, "terminate called without an
    active exception"; seen twice in CI, in the AnyRes and the LoRA FSDP2 runs
    of tests/test_distributed.py), after every artifact was written and rank 0
    had printed its summary: torchrun then reports the run as failed. Nothing
    is left to write at that point, so the process flushes its streams and
    log files and exits with status 0 directly. A run in one process (no
    group) returns normally.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    close_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    runner_cfg['model']['trainable_dtype'] = cfg.get('trainable_dtype')
    if (strategy is not None and strategy['type'] == 'FSDP2Strategy'
            and cfg.get('launcher', 'none') == 'none'):
        strategy = None  # one process: nothing to shard across, it trains as without
    if strategy is None:
        # A text-only batch leaves the projector out of stage 3's graph.
        runner_cfg['find_unused_parameters'] = stage == 'finetune'
        if cfg.get('launcher', 'none') != 'none' and not torch.cuda.is_available():
            runner_cfg['model_wrapper_cfg'] = dict(
                type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
                find_unused_parameters=runner_cfg['find_unused_parameters'])
        if precision is not None:
            optim_wrapper.update(type=AUTOCAST[precision], dtype=precision)
        return runner_cfg

    if strategy['type'] == 'FSDP2Strategy':
        # The optimizer wrapper (accumulation, clipping, guard) is DDP's; the
        # precision is FSDP2's, not autocast.
        runner_cfg['runner_type'] = 'FSDPRunner'
        runner_cfg['model_wrapper_cfg'] = dict(
            type='FullyShardedModel', param_dtype=precision, reduce_dtype='float32',
            reshard_after_forward=strategy.get('reshard_after_forward', True))
        return runner_cfg

    runner_cfg['runner_type'] = 'FlexibleRunner'
    strategy['gradient_accumulation_steps'] = accumulation
    clip_grad = optim_wrapper.get('clip_grad')
    if clip_grad:
        strategy['gradient_clipping'] = clip_grad['max_norm']
    if precision is not None:
        strategy['bf16' if precision == 'bfloat16' else 'fp16'] = dict(enabled=True)
    # DeepSpeed owns accumulation, clipping and precision.
    # Its parameter groups (the projector's own lr, `projector_lr`) stay.
    groups = {key: optim_wrapper[key] for key in ('constructor', 'paramwise_cfg')
              if key in optim_wrapper}
    runner_cfg['optim_wrapper'] = dict(type='DeepSpeedOptimWrapper',
                                       optimizer=optim_wrapper['optimizer'], **groups)
    runner_cfg['strategy'] = strategy
    return runner_cfg


def build_runner(runner_cfg):
    """A ``Runner`` or the strategy's: ``FSDPRunner``, ``FlexibleRunner``."""
    if runner_cfg.get('runner_type') == 'FSDPRunner':
        return FSDPRunner.from_cfg(runner_cfg)
    return RUNNERS.build(runner_cfg)
