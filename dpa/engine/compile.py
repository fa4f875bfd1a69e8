"""GPU speed switches of the runtime: TF32 matmuls and torch.compile.

The reference trains with ``--tf32 True --torch_compile True`` (transformers'
Trainer: ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.compile(model,
backend='inductor')``). Config keys (top level, ``configs/_base_/runtime_gpu.py``):

- ``tf32``: True runs float32 matmuls on TF32 tensor cores
  (``torch.set_float32_matmul_precision('high')``) when the stage runs on a
  CUDA device. Under bf16 autocast most matmuls are bf16 already; what stays in
  float32 (the projector's master-weight path, losses, norms) gets faster. A
  numerical change (10-bit mantissa products), as in the reference.
- ``compile``: False (default), True, or the keyword arguments of
  ``torch.compile`` (``dict(backend='inductor', mode='max-autotune-no-cudagraphs')``).
  Compiles the ``forward`` of each decoder layer of the LLM: the repeated block
  that holds nearly all the compute, compiled once and reused by every layer.
  Hooks around the layer (FSDP2's all-gathers, activation checkpointing)
  stay outside the compiled code, parameters and their names are unchanged,
  so checkpoints, the artifact and resume are the same with or without it.
  The CMO/CAL loss, the projector and the vision tower stay eager: their
  shapes change from batch to batch (number of supervised tokens, images).
"""
import logging
from typing import Union

import torch
from mmengine.logging import print_log
from torch import nn

from dpa.errors import ConfigError
from dpa.engine.fsdp import sharded_units


DEEPSPEED_COMPILE = ('compile: this strategy builds the model when training starts '
                     '(DeepSpeed); compile=True works with DDP and FSDP2')


def compile_options(value: Union[bool, dict, None]) -> Union[dict, None]:
    """The ``torch.compile`` keyword arguments a ``compile`` config value asks for
    (None: no compilation).

    Raises:
        ConfigError: a value that is neither a bool nor a dict.
    """
    if value is None or value is False:
        return None
    if value is True:
        return dict(backend='inductor')
    if isinstance(value, dict):
        return dict(dict(backend='inductor'), **value)
    raise ConfigError(f'compile={value!r}: give True, False or the keyword arguments of '
                      "torch.compile, e.g. dict(backend='inductor', mode='max-autotune')")


def check_compile(cfg) -> None:
    """The ``compile`` value and its strategy, checked before any model loads.

    Raises:
        ConfigError: a value :func:`compile_options` refuses, or compile with
            DeepSpeed (which builds the model when training starts).
    """
    if compile_options(cfg.get('compile', False)) is None:
        return
    if (cfg.get('strategy') or {}).get('type') == 'DeepSpeedStrategy':
        raise ConfigError(DEEPSPEED_COMPILE)


def compile_decoder_layers(llm: nn.Module, **options) -> int:
    """Compile the ``forward`` of every decoder layer of ``llm`` in place.

    Args:
        llm: a Hugging Face causal LM (or a wrapper holding one).
        **options: keyword arguments of ``torch.compile``.

    Returns:
        The number of layers compiled.

    Raises:
        ValueError: ``llm`` has no layers its ``_no_split_modules`` names.
    """
    # The decoder layers: FSDP2's units (the classes ``_no_split_modules`` names).
    layers = sharded_units(llm)
    if not layers:
        raise ValueError(f'compile: no decoder layers found in {type(llm).__name__} (its '
                         '`_no_split_modules` names none); set compile=False')
    for layer in layers:
        # The bound forward, not the module: hooks and parameter names stay as they are.
        layer.forward = torch.compile(layer.forward, **options)
    return len(layers)


def apply_gpu_switches(cfg, runner) -> None:
    """Apply ``tf32`` and ``compile`` to a stage's built runner.

    Args:
        cfg: the pipeline config.
        runner: the stage's Runner, its model built (and wrapped).
    """
    if cfg.get('tf32') and torch.cuda.is_available():
        torch.set_float32_matmul_precision('high')
    options = compile_options(cfg.get('compile', False))
    if options is None:
        return
    model = getattr(runner.model, 'module', runner.model)  # DDP / FSDP2 wrappers
    if not isinstance(model, nn.Module):
        raise ConfigError(DEEPSPEED_COMPILE)
    count = compile_decoder_layers(model.llm, **options)
    print_log(f'compile: {count} decoder layers of the LLM compiled with {options}',
              logger='current', level=logging.INFO)
