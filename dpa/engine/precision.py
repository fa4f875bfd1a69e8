"""Which dtype the optimizer steps: float32 master weights, bf16 compute.

An AdamW step at lr 4e-5 on a bf16 weight drawn from N(0, 0.02) leaves about
43% of its entries unchanged: the update is below half a bf16 ulp of the
weight and rounds away (tests/test_precision.py measures it on the pipeline's
own training path). So every trainable parameter is held in float32 and the
compute runs in bf16 under autocast (DDP: ``GuardedAutocastOptimWrapper``;
FSDP2: ``MixedPrecisionPolicy(param_dtype=bfloat16)`` over float32 shards);
DeepSpeed's bf16 optimizer keeps float32 master weights itself. Frozen weights
may stay in bf16: nothing updates them.

Config keys (top level):

- ``trainable_dtype``: ``'float32'`` casts the trainable parameters (LLM,
  projector, vision tower: whatever the stage trains) to float32 when the model
  is built, before it is wrapped; None keeps the dtype they are loaded in.
  ``_base_/runtime_gpu.py`` sets ``'float32'``.
- ``allow_bf16_weights``: True lets an optimizer step bf16/fp16 weights
  directly. Lossy (see above); for memory experiments only.

:func:`check_precision` refuses a stage that would step half-precision weights
without either key, before any model is loaded.
"""
import logging
from typing import Dict, Sequence

import torch
from mmengine.logging import print_log

from dpa.errors import ConfigError

TRAINABLE_DTYPES = (None, 'float32')
HALF = ('bfloat16', 'float16')
# PEFT casts LoRA adapters of a half-precision base to float32
# (``autocast_adapter_dtype=True``, its default); the projector is built in float32.
ALWAYS_FLOAT32 = ('lora', 'projector')


def loaded_dtype(cfg, part: str) -> str:
    """The dtype a trainable part is built in, read from the config."""
    if part in ALWAYS_FLOAT32:
        return 'float32'
    return (cfg.get(part) or {}).get('torch_dtype', 'float32')


def keeps_master_weights(cfg) -> bool:
    """Whether the strategy's optimizer keeps float32 copies of half-precision
    weights itself (DeepSpeed's bf16/fp16 optimizers do)."""
    strategy = cfg.get('strategy') or {}
    return strategy.get('type') == 'DeepSpeedStrategy' and cfg.get('mixed_precision') is not None


def check_precision(cfg, trainable: Dict[str, Sequence[str]]) -> None:
    """Refuse a stage whose optimizer would step bf16 or fp16 weights.

    Args:
        cfg: the pipeline config.
        trainable: the trainable parts of each stage to run, by stage name.

    Raises:
        ConfigError: naming the stage, the part, its dtype and the fix.
    """
    dtype = cfg.get('trainable_dtype')
    if dtype not in TRAINABLE_DTYPES:
        raise ConfigError(f'trainable_dtype={dtype!r}: choose among {TRAINABLE_DTYPES} '
                          '(None keeps the dtype the weights are loaded in)')
    allowed = cfg.get('allow_bf16_weights', False)
    if not isinstance(allowed, bool):
        raise ConfigError(f'allow_bf16_weights={allowed!r}: True or False')
    if dtype == 'float32' or allowed or keeps_master_weights(cfg):
        return
    for stage, parts in trainable.items():
        for part in parts:
            loaded = loaded_dtype(cfg, part)
            if loaded in HALF:
                raise ConfigError(
                    f'stage {stage!r} trains `{part}`, loaded in {loaded} ({part}.torch_dtype), '
                    'and its optimizer would step those weights directly: an AdamW update at '
                    f'lr 4e-5 leaves about 43% of N(0, 0.02) {loaded} weights unchanged. Set '
                    "trainable_dtype='float32' (float32 master weights, bf16 compute under "
                    "mixed_precision='bfloat16'; _base_/runtime_gpu.py does), or use a "
                    'DeepSpeed strategy with mixed_precision; allow_bf16_weights=True accepts '
                    'the lost updates')


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or
    AMX): autocast to bf16 then runs several times faster than float32
    (docs/benchmarks.md), and without them slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # torch without the probes: say nothing
        return True


def warn_cpu_bf16(cfg) -> None:
    """Warn, before any model loads, when ``mixed_precision='bfloat16'`` will
    run on a CPU without native bf16 (a config written for a CPU that has it,
    such as ``dpa_smollm2_135m.py``, then trains slower than in float32)."""
    if cfg.get('mixed_precision') != 'bfloat16' or torch.cuda.is_available():
        return
    if not native_cpu_bf16():
        print_log("mixed_precision='bfloat16' on a CPU without native bf16 (AVX512-BF16 or "
                  'AMX): torch emulates it, slower than float32 here; '
                  '`--cfg-options mixed_precision=None` trains in float32',
                  logger='current', level=logging.WARNING)
