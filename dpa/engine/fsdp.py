"""Sharded training with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

``configs/_base_/strategies/fsdp.py`` selects it:
``strategy = dict(type='FSDP2Strategy')``. The pipeline then runs each stage
with :class:`FSDPRunner`, mmengine's ``Runner`` with three changes:

- the model is wrapped by :class:`FullyShardedModel`: one FSDP unit per
  decoder layer of the LLM (its ``_no_split_modules``) plus the root for the
  rest (embeddings, LM head, projector, vision tower); the parameters stay in the
  dtype they are held in (float32 master weights, see
  :mod:`dpa.engine.precision`) and, with ``mixed_precision='bfloat16'``, are
  gathered in bf16 for the compute (``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=float32)``). The optimizer wrapper, its gradient accumulation
  and the non-finite-loss guard are the DDP ones.
- checkpoints are sharded: ``iter_N.dcp/`` (torch.distributed.checkpoint, the
  trainable weights and the optimizer state, every rank its shard) and then
  ``iter_N.pth`` (rank 0: iteration, schedulers, message hub, hook state)
  written last, so an ``iter_N.pth`` names a complete checkpoint, as in DDP.
- :func:`gather_full_weights` turns the sharded model back into one with full
  weights on rank 0 (CPU) when training ends, so the stage's artifact writer
  (``DPAHook``) writes what an unsharded run writes.
"""
import glob
import os.path as osp
import re
import shutil
from collections import OrderedDict
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from mmengine.device import get_device
from mmengine.dist import barrier, broadcast, get_rank, is_main_process
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from dpa.registry import MODEL_WRAPPERS, RUNNERS

SHARDED_SUFFIX = '.dcp'


def sharded_units(model: nn.Module):
    """The modules that become FSDP units of their own: every instance of a
    class the LLM (a transformers model) names in ``_no_split_modules``, its
    decoder layers.

    The vision tower stays in the root unit: it runs only on the ranks whose
    batch holds images, and a unit of its own would gather its weights with
    collectives the other ranks never join.
    """
    llm = getattr(model, 'llm', model)
    names = set()
    for module in llm.modules():
        if isinstance(module, PreTrainedModel):
            names.update(module._no_split_modules or [])
    return [module for module in llm.modules() if type(module).__name__ in names]


@MODEL_WRAPPERS.register_module()
class FullyShardedModel(nn.Module):
    """FSDP2 over an mmengine model: its layers and its root are sharded in
    place (``fully_shard``), and the training steps are the model's own.

    Args:
        module: the model (an mmengine ``BaseModel``), on the CPU.
        param_dtype: dtype the parameters are gathered in for the compute
            (``'bfloat16'``), None: the dtype they are held in.
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free the gathered parameters of a unit after
            its forward (re-gathered for the backward): ZeRO-3 memory.
    """

    def __init__(self, module: nn.Module, param_dtype: Optional[str] = None,
                 reduce_dtype: Optional[str] = 'float32', reshard_after_forward: bool = True):
        super().__init__()
        device = get_device()  # the launcher has set this rank's GPU
        mesh = init_device_mesh(device, (dist.get_world_size(), ))
        policy = MixedPrecisionPolicy(
            param_dtype=getattr(torch, param_dtype) if param_dtype else None,
            reduce_dtype=getattr(torch, reduce_dtype) if reduce_dtype else None)
        # The data preprocessor puts batches where it was moved (mmengine's
        # wrap_model moves the whole model; here only it, then the shards).
        if hasattr(module, 'data_preprocessor'):
            module.data_preprocessor.to(device)
        # Sharded from the CPU copy unit by unit: each unit is moved to the
        # GPU whole, split, and only this rank's shard stays.
        for unit in sharded_units(module):
            fully_shard(unit, mesh=mesh, mp_policy=policy,
                        reshard_after_forward=reshard_after_forward)
        fully_shard(module, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
        if hasattr(module, 'same_passes_on_every_rank'):
            module.same_passes_on_every_rank = True
        self.module = module

    def train_step(self, data, optim_wrapper):
        return self.module.train_step(data, optim_wrapper)

    def val_step(self, data):
        return self.module.val_step(data)

    def test_step(self, data):
        return self.module.test_step(data)


def gather_full_weights(wrapped: nn.Module) -> None:
    """End of training under FSDP: every rank takes part in gathering each
    parameter, one tensor at a time onto rank 0's CPU
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), so no
    GPU ever holds the full model; rank 0's model then holds them as plain
    parameters, the other ranks' keep their shards. A no-op for other models.
    The model cannot train after this.
    """
    if not isinstance(wrapped, FullyShardedModel):
        return
    model = wrapped.module
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = {}
    # Per child: the model's own state_dict holds its trainable weights only,
    # the writers need the frozen ones too.
    for name, child in model.named_children():
        if any(True for _ in child.parameters()):
            state = get_model_state_dict(child, options=options)
            full.update({f'{name}.{key}': value for key, value in state.items()})
    if not is_main_process():
        return
    replaced = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:  # tied parameters stay tied
                key = f'{module_name}.{name}' if module_name else name
                replaced[id(param)] = nn.Parameter(full[key], requires_grad=param.requires_grad)
            module._parameters[name] = replaced[id(param)]
    if hasattr(model, 'same_passes_on_every_rank'):
        model.same_passes_on_every_rank = False  # rank 0 alone may run it now


def _no_weights():
    empty = OrderedDict()
    empty._metadata = OrderedDict()  # what mmengine's weights_to_cpu reads
    return empty


def sharded_dir(checkpoint: str) -> str:
    """The sharded weights and optimizer state beside ``iter_N.pth``."""
    return re.sub(r'\.pth$', SHARDED_SUFFIX, checkpoint)


@RUNNERS.register_module()
class FSDPRunner(Runner):
    """mmengine's ``Runner`` for :class:`FullyShardedModel`, with sharded
    checkpoints (see the module's docstring)."""

    def wrap_model(self, model_wrapper_cfg, model):
        # Not mmengine's: it would move the whole model to the GPU first.
        cfg = dict(model_wrapper_cfg or {})
        cfg.pop('type', None)
        # mmengine initialises and broadcasts the weights after wrapping
        # (_init_model_weights); sharded weights cannot be broadcast, so it
        # happens here, before sharding.
        if hasattr(model, 'init_weights'):
            model.init_weights()
            for tensor in model.state_dict().values():
                broadcast(tensor)
        return FullyShardedModel(model, **cfg)

    def _init_model_weights(self):
        pass  # done in wrap_model

    def _state(self):
        model = self.model.module
        model_state, optim_state = get_state_dict(model, self.optim_wrapper.optimizer)
        return {'model': model_state, 'optimizer': optim_state}

    def save_checkpoint(self, out_dir, filename, *args, save_optimizer=True, meta=None,
                        **kwargs):
        """Every rank writes its shard to ``iter_N.dcp``, then rank 0 writes
        ``iter_N.pth`` without weights or optimizer state."""
        path = osp.join(out_dir, filename)
        state = self._state()
        dcp.save(state, checkpoint_id=sharded_dir(path))
        # AdamW has no state for a parameter that never had a gradient (the
        # projector after image-free batches); resume must not invent one.
        meta = dict(meta or {}, optimizer_state_of=sorted(state['optimizer']['state']))
        model = self.model.module
        # mmengine's writer puts model.state_dict() in the .pth: the weights
        # are in the sharded directory already.
        model.state_dict = _no_weights
        try:
            super().save_checkpoint(out_dir, filename, *args, save_optimizer=False, meta=meta,
                                    **kwargs)
        finally:
            del model.state_dict
        if is_main_process():
            self._remove_orphaned_shards(out_dir)
        # Every rank sees the .pth before any goes on (GracefulExitHook looks).
        barrier()

    @staticmethod
    def _remove_orphaned_shards(out_dir):
        # CheckpointHook removes old iter_N.pth files (max_keep_ckpts), not
        # the directories beside them.
        for directory in glob.glob(osp.join(out_dir, f'iter_*{SHARDED_SUFFIX}')):
            if not osp.exists(re.sub(rf'{re.escape(SHARDED_SUFFIX)}$', '.pth', directory)):
                shutil.rmtree(directory, ignore_errors=True)

    def load_checkpoint(self, filename, map_location='cpu', strict=False, revise_keys=None):
        """Load ``iter_N.pth`` and its sharded weights and optimizer state
        (the optimizer exists already: resume builds it first)."""
        checkpoint = _load_checkpoint(filename, map_location='cpu')
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        state = self._state()
        saved = set(checkpoint['meta']['optimizer_state_of'])
        state['optimizer']['state'] = {
            name: value for name, value in state['optimizer']['state'].items() if name in saved}
        dcp.load(state, checkpoint_id=sharded_dir(filename))
        set_model_state_dict(self.model.module, state['model'])
        # strict=False: the parameters without saved state (above) stay without.
        set_optimizer_state_dict(self.model.module, self.optim_wrapper.optimizer,
                                 state['optimizer'], options=StateDictOptions(strict=False))
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename} and {sharded_dir(filename)} '
                         f'(rank {get_rank()}: its shard)')
        return checkpoint
