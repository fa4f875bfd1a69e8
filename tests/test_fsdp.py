"""FSDP2 pieces that need no process group: which modules become units, and
the model initialisation both DDP and FSDP2 runs share. The two-process runs
are in tests/test_distributed.py."""
import torch

import dpa  # noqa: F401
from dpa.engine.fsdp import sharded_units
from dpa.engine.stage_config import stage_runner_config
from dpa.registry import MODELS
from tiny import tiny_config


def test_one_unit_per_decoder_layer_the_vision_tower_in_the_root(tmp_path):
    """The vision tower runs only on ranks whose batch holds images: units of
    its own would gather weights in collectives the other ranks never join."""
    cfg = tiny_config(tmp_path / 'work', tmp_path / 'data')
    model = MODELS.build(stage_runner_config(cfg, 'proxy').model)
    model.vision_tower = MODELS.build(cfg.vision_tower)
    units = sharded_units(model)
    assert [type(u).__name__ for u in units] == ['Qwen2DecoderLayer'] * 2
    assert all(unit in set(model.llm.modules()) for unit in units)


def test_the_runner_keeps_peft_lora_initialisation(tmp_path):
    """mmengine's Runner calls init_weights before training; transformers'
    initialiser used to redraw LoRA there (B no longer zero), at a point that
    differs between DDP and FSDP2 runs."""
    cfg = tiny_config(tmp_path / 'work', tmp_path / 'data')
    model = MODELS.build(stage_runner_config(cfg, 'proxy').model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.init_weights()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    lora_b = [p for name, p in model.named_parameters() if 'lora_B' in name]
    assert lora_b and all(not p.any() for p in lora_b)
