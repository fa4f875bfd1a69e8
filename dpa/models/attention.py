"""Which attention kernel an LLM runs: ``attn_implementation`` of ``HFCausalLM``.

A config names one kernel (``'sdpa'``, ``'eager'``, ``'flash_attention_2'``) or an
ordered preference, e.g. ``['flash_attention_2', 'sdpa']``: the first one this
machine can run is taken and a fallback is logged with the reason, so one config
serves a GPU node with flash-attn installed and a laptop without it.

What the kernels compute for training (transformers 5.24 source):

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; refuses
  attention-logit soft-capping (``integrations/sdpa_attention.py`` raises on
  ``softcap``; Gemma-2 declares ``_supports_sdpa = False``).
- ``flash_attention_2`` (the ``flash-attn`` package, CUDA): soft-capping
  supported (``softcap``, flash-attn >= 2.6); padding-free packed rows run its
  variable-length kernel, but only for a batch of ONE row: ``_is_packed_sequence``
  returns False for more rows, and the sequences of a row would then attend to
  each other. Stage-1 packing therefore puts a whole batch in one row under
  this kernel (:func:`packs_into_one_row`).
- ``eager``: plain matmul + softmax; everything supported, slowest.
- ``flex_attention``: soft-capping via ``score_mod``; needs torch.compile.
"""
import importlib.util
import logging
from typing import Sequence, Union

from mmengine.logging import print_log

KERNELS = ('eager', 'sdpa', 'flash_attention_2', 'flex_attention')
# Attention-logit soft-capping (Gemma-2): the kernels that apply it.
SOFTCAP_KERNELS = ('eager', 'flash_attention_2', 'flex_attention')
# Kernels that read the restarts of ``position_ids`` of a padding-free row as
# sequence boundaries only when the batch is one row.
ONE_ROW_VARLEN = ('flash_attention_2', )


def kernel_unavailable(kernel: str) -> str:
    """Why ``kernel`` cannot run here ('' when it can)."""
    if kernel not in KERNELS:
        return f'unknown attention kernel {kernel!r} (choose among {KERNELS})'
    if kernel == 'flash_attention_2':
        if importlib.util.find_spec('flash_attn') is None:
            return 'the flash-attn package is not installed (pip install flash-attn)'
        import torch
        if not torch.cuda.is_available():
            return 'flash-attn needs a CUDA device'
    return ''


def resolve_attn_implementation(choice: Union[str, Sequence[str]], log: bool = True) -> str:
    """The kernel to build an LLM with.

    Args:
        choice: a kernel name, or kernel names in order of preference.
        log: log the kernels passed over and why.

    Returns:
        The first kernel of ``choice`` this machine can run.

    Raises:
        ValueError: an unknown name, or none of the kernels can run here.
    """
    choices = [choice] if isinstance(choice, str) else list(choice)
    if not choices:
        raise ValueError('attn_implementation: give a kernel name or a list of them')
    reasons = []
    for kernel in choices:
        reason = kernel_unavailable(kernel)
        if kernel not in KERNELS:
            raise ValueError(f'attn_implementation: {reason}')
        if not reason:
            if reasons and log:
                print_log(f'attention: using {kernel!r}; ' + '; '.join(reasons),
                          logger='current', level=logging.WARNING)
            return kernel
        reasons.append(f'{kernel!r} passed over: {reason}')
    raise ValueError(f'attn_implementation={choices}: no kernel can run here ('
                     + '; '.join(reasons) + "); add 'sdpa' or 'eager' as a fallback")


def packs_into_one_row(llm_cfg: dict) -> bool:
    """Whether stage-1 packing must put a whole batch in one row for this LLM's
    kernel to keep the packed samples apart (see the module docstring)."""
    choice = llm_cfg.get('attn_implementation', 'sdpa')
    return resolve_attn_implementation(choice, log=False) in ONE_ROW_VARLEN
