"""How a stage's batches are loaded: worker processes, pinned memory, prefetching.

The reference trains every stage with ``--dataloader_num_workers 4``: image
decoding, padding to a square and the CLIP processor then run beside the GPU
step instead of before it. Here the GPU runtime (``configs/_base_/runtime_gpu.py``)
sets ``dataloader = dict(num_workers=4, pin_memory=True, persistent_workers=True,
prefetch_factor=2)`` for every stage; a stage's recipe overrides the worker count
(``--cfg-options align.num_workers=8``). Configs without ``dataloader`` (the tiny
default, the CPU experiments) and the tiny stand-in switch load in the training
process (``num_workers=0``).

Workers do not change what a stage computes: the sampler that orders the
samples runs in the training process, the datasets are deterministic, and a
resumed run skips the trained batches through the same loader (tested in
tests/test_reliability.py with two workers). Workers ignore SIGINT/SIGTERM
(:func:`dpa.engine.interrupts.signal_safe_worker_init`) so they keep feeding the
training process until it has saved its checkpoint.
"""
from typing import Optional

import torch
from mmengine.config import Config

from dpa.errors import ConfigError

LOADER_KEYS = ('num_workers', 'pin_memory', 'persistent_workers', 'prefetch_factor')


def loader_settings(cfg: Config, stage: str, cuda: Optional[bool] = None) -> dict:
    """The ``torch.utils.data.DataLoader`` arguments of one stage.

    Args:
        cfg: a pipeline config; reads ``cfg.dataloader`` (defaults of every
            stage) and ``cfg[stage].num_workers`` (the stage's override).
        stage: ``'proxy'``, ``'align'`` or ``'finetune'``.
        cuda: whether batches go to a CUDA device (pinned memory only helps
            then); default: whether CUDA is available.

    Returns:
        ``num_workers``, ``pin_memory``, ``persistent_workers`` and, with
        workers, ``prefetch_factor`` (the DataLoader refuses it without).

    Raises:
        ConfigError: an unknown key in ``cfg.dataloader`` or a negative worker count.
    """
    defaults = dict(cfg.get('dataloader') or {})
    unknown = sorted(set(defaults) - set(LOADER_KEYS))
    if unknown:
        raise ConfigError(f'dataloader: unknown key(s) {unknown}; the keys are {list(LOADER_KEYS)}')
    recipe = cfg[stage]
    workers = recipe.get('num_workers')
    if workers is None:
        workers = defaults.get('num_workers', 0)
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f'{stage}.num_workers must be an integer >= 0, got {workers!r}')
    if cuda is None:
        cuda = torch.cuda.is_available()
    settings = dict(num_workers=workers,
                    pin_memory=bool(defaults.get('pin_memory', False)) and cuda,
                    persistent_workers=bool(defaults.get('persistent_workers', False))
                    and workers > 0)
    if workers > 0 and defaults.get('prefetch_factor') is not None:
        settings['prefetch_factor'] = int(defaults['prefetch_factor'])
    return settings
