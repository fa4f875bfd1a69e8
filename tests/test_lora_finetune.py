"""Stage 3 with LoRA (``finetune.lora``, issue 31) on the tiny default: what
trains and at which learning rates, the merged final model and its adapter,
merged == unmerged logits, resume, staleness, reuse, the config checks, the
dry run and the memory plan. The two-process runs (DDP, FSDP2) are in
tests/test_distributed.py."""
import json
import os
import os.path as osp
import shutil
import signal
import sys

import pytest
import torch
import transformers
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from peft import PeftModel
from safetensors.torch import load_file

import dpa  # noqa: F401
from dpa.artifacts import read_manifest
from dpa.engine.dry_run import dry_run
from dpa.engine.interrupts import TrainingInterrupted
from dpa.engine.memory_plan import architecture, plan_stage
from dpa.engine.pipeline import run_pipeline
from dpa.engine.preflight import REUSED, STALE, check_config, plan_run
from dpa.engine.stage_config import stage_runner_config, stage_trainable
from dpa.errors import ConfigError
from dpa.models import LlavaDPAModel
from dpa.models.builders import PROCESSORS, num_image_tokens
from dpa.models.export import load_native, save_native
from dpa.models.proxy import FINETUNE_ADAPTER_DIR, merge_lora
from dpa.registry import MODELS
from test_reliability import SignalAt  # noqa: F401  (registers the hook)
from tiny import REPO, tiny_config

pytestmark = pytest.mark.usefixtures('one_thread')
TINY_LORA = osp.join(REPO, 'configs', 'ablations', 'dpa_tiny_lora_finetune.py')
LORA_FILES = ('llm/model.safetensors', f'{FINETUNE_ADAPTER_DIR}/adapter_model.safetensors',
              'projector.safetensors')


def lora_config(work_dir, data_root, **overrides):
    return tiny_config(work_dir, data_root, path=TINY_LORA, **overrides)


def copy_stages(source, target, stages=('proxy', 'align')):
    for stage in stages:
        shutil.copytree(osp.join(source, stage), osp.join(target, stage))


def batch(cfg, seed=0, rows=2, length=24):
    """Right-padded rows, each with one image's tokens after a text prefix."""
    g = torch.Generator().manual_seed(seed)
    tokenizer = PROCESSORS.build(cfg.tokenizer)
    image_id = tokenizer.convert_tokens_to_ids('<image>')
    n_image = num_image_tokens(cfg.vision_tower)
    input_ids = torch.randint(10, 200, (rows, n_image + length), generator=g)
    input_ids[:, 2:2 + n_image] = image_id
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -5:] = 0
    size = cfg.vision_tower.config.image_size
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                pixel_values=torch.randn(rows, 3, size, size, generator=g))


def logits(model, inputs):
    dtype = next(model.projector.parameters()).dtype
    with torch.no_grad():
        return model(inputs['input_ids'], inputs['attention_mask'],
                     pixel_values=inputs['pixel_values'].to(dtype), mode='tensor')


# ------------------------------------------------------------------ no training

def test_merged_and_unmerged_forward_give_the_same_logits_float64(tmp_path):
    """The final model is written merged (W + alpha/r B A): in float64 its
    logits are the adapted model's, in memory and after save_native/load_native."""
    cfg = Config.fromfile(TINY_LORA)
    torch.manual_seed(0)
    model = LlavaDPAModel(
        llm=dict(type='ProxyLLMWrapper', llm=cfg.llm, lora=cfg.finetune.lora),
        tokenizer=cfg.tokenizer, vision_tower=cfg.vision_tower,
        loss=dict(type='VisualRelevanceLoss', mode='cmo'),
        trainable=('lora', 'projector')).double().eval()
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for name, param in model.named_parameters():
            if 'lora_B' in name:
                param.normal_(0, 0.2)
    inputs = batch(cfg)
    unmerged = logits(model, inputs)
    assert unmerged.dtype == torch.float64
    base = model.llm.get_base_model()
    with model.llm.disable_adapter():
        without_adapters = logits(model, inputs)
    assert (unmerged - without_adapters).abs().max() > 1e-2

    merge_lora(model)
    assert model.llm is base and not any('lora_' in n for n, _ in model.named_parameters())
    merged = logits(model, inputs)
    assert (merged - unmerged).abs().max().item() < 1e-10

    tokenizer = PROCESSORS.build(cfg.tokenizer)
    save_native(model, tokenizer, PROCESSORS.build(cfg.image_processor), str(tmp_path))
    reloaded = load_native(str(tmp_path)).double().eval()
    # The reloaded projector is built in float32 and loads the float64 weights.
    assert (logits(reloaded, inputs) - merged).abs().max().item() < 1e-5


def test_stage3_trains_the_adapters_and_the_projector_at_their_own_rates(finished, data_root):
    work_dir, _ = finished
    cfg = lora_config(work_dir, data_root)
    assert stage_trainable(cfg, 'finetune') == ['lora', 'projector']
    assert stage_trainable(tiny_config(work_dir, data_root), 'finetune') == ['llm', 'projector']
    runner_cfg = stage_runner_config(cfg, 'finetune')
    model = MODELS.build(runner_cfg.model)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all('lora_' in n or n.startswith('projector.') for n in trained)
    assert any(n.startswith('projector.') for n in trained)
    # The dry run's and the memory plan's count is the model's.
    count = sum(p.numel() for p in trained.values())
    assert plan_stage(cfg, 'finetune', 1, ['lora', 'projector'])['trainable_parameters'] == count
    # LLaVA's mm_projector_lr: two groups, the frozen weights in neither.
    optim_wrapper = build_optim_wrapper(model, runner_cfg.optim_wrapper)
    groups = optim_wrapper.optimizer.param_groups
    assert [g['lr'] for g in groups] == [4e-4, 4e-5]
    projector = {id(p) for p in model.projector.parameters()}
    assert {id(p) for p in groups[1]['params']} == projector
    assert sum(p.numel() for g in groups for p in g['params']) == count


@pytest.mark.parametrize('options, message', [
    ({'align.lora': dict(r=8)}, 'align.lora: the align stage trains no LLM weights'),
    ({'finetune.trainable': ['llm', 'lora', 'projector']}, "'llm' trains every weight"),
    ({'finetune.lora': None, 'finetune.trainable': ['lora', 'projector']},
     'finetune.lora is not set'),
    ({'finetune.lora.r': 0}, 'finetune.lora.r must be a positive integer'),
    ({'finetune.lora.lora_dropout': 1.0}, 'finetune.lora.lora_dropout'),
    ({'finetune.lora.rank': 8}, 'peft.LoraConfig does not know'),
    ({'finetune.projector_lr': -1.0}, 'finetune.projector_lr'),
    ({'align.projector_lr': 1e-3}, 'align.projector_lr: the stage trains'),
])
def test_lora_settings_are_checked_before_loading(tmp_path, options, message):
    cfg = lora_config(tmp_path / 'work', tmp_path / 'data')
    cfg.merge_from_dict(options)
    with pytest.raises(ConfigError, match=message.replace('.', r'\.').replace('(', r'\(')):
        check_config(cfg, ['proxy', 'align', 'finetune'])


def test_dry_run_shows_what_trains_and_the_memory(tmp_path):
    text = dry_run(lora_config(tmp_path / 'work', tmp_path / 'data'))
    finetune = text[text.index('[finetune]'):]
    assert ('trainable: lora, projector (LoRA r=8, alpha=16, dropout 0.05 on all-linear '
            'modules): 24.7K parameters (LLM 139.8K)') in finetune
    assert 'memory per process (estimate, tools/plan_memory.py)' in finetune
    assert 'optimizer: AdamW lr 0.0004 (projector 4e-05)' in finetune


def test_memory_plan_of_7b_lora_on_one_80gb_gpu(capsys):
    """The figures docs/lora.md quotes: the frozen bf16 LLM, float32 LoRA
    r=128 on every linear layer plus the projector, one GPU."""
    sys.path.insert(0, osp.join(REPO, 'tools'))
    from plan_memory import main
    config = osp.join(REPO, 'configs', 'dpa_qwen2_5_7b_lora.py')
    assert main([config, '--gpus', '1', '--gpu-memory', '80']) == 0
    out = capsys.readouterr().out
    finetune = next(line for line in out.splitlines() if line.startswith('finetune'))
    assert finetune.split()[1:3] == ['DDP', '339.5M'] and finetune.endswith('yes')
    cfg = Config.fromfile(config)
    cfg.llm.pretrained = '/nowhere/Qwen2.5-7B-Instruct'
    assert architecture(cfg.llm)['hidden_size'] == 3584
    # The full stage 3 of the same config does not fit one GPU.
    assert main([config, '--gpus', '1', '--gpu-memory', '80',
                 '--cfg-options', 'finetune.lora=None']) == 1


# ------------------------------------------------------------------ a finished run

@pytest.fixture(scope='module')
def lora_run(finished, data_root, tmp_path_factory):
    """The LoRA config run on the tiny default's stages 1-2: its stage 3 and eval."""
    work_dir = tmp_path_factory.mktemp('lora')
    copy_stages(finished[0], work_dir)
    manifests = run_pipeline(lora_config(work_dir, data_root))
    return work_dir, {m['stage']: m for m in manifests}


def test_the_artifact_is_a_merged_model_with_its_adapter(lora_run):
    work_dir, manifests = lora_run
    assert manifests['proxy']['skipped'] and manifests['align']['skipped']
    manifest = read_manifest(str(work_dir), 'finetune', verify=True)
    artifact = manifest['artifact']
    for name in LORA_FILES + (f'{FINETUNE_ADAPTER_DIR}/adapter_config.json',
                              'hf_llava/model.safetensors', 'dpa_model.json'):
        assert name in manifest['checksums'], name
    assert any('LoRA merged' in note for note in manifest['notes'])
    assert manifest['stage_config']['finetune']['lora']['r'] == 8
    assert not any('lora' in key for key in load_file(osp.join(artifact, LORA_FILES[0])))
    # The eval stage scored the merged model as it scores any final model.
    assert 'accuracy' in json.dumps(manifests['eval']['metrics'])


def test_merged_model_is_the_base_llm_with_the_adapter(lora_run):
    """What every consumer loads (load_native, hf_llava) answers as the
    original LLM with the saved adapter and projector does."""
    work_dir, manifests = lora_run
    artifact = manifests['finetune']['artifact']
    cfg = lora_config(work_dir, 'unused')
    native = load_native(artifact).eval()
    unmerged = LlavaDPAModel(
        llm=cfg.llm, tokenizer=cfg.tokenizer, vision_tower=cfg.vision_tower,
        projector_weights=osp.join(artifact, 'projector.safetensors')).eval()
    unmerged.llm = PeftModel.from_pretrained(unmerged.llm,
                                             osp.join(artifact, FINETUNE_ADAPTER_DIR)).eval()
    base = LlavaDPAModel(llm=cfg.llm, tokenizer=cfg.tokenizer, vision_tower=cfg.vision_tower,
                         projector_weights=osp.join(artifact, 'projector.safetensors')).eval()
    inputs = batch(cfg)
    ours = logits(native, inputs)
    torch.testing.assert_close(ours, logits(unmerged, inputs), rtol=0, atol=1e-5)
    assert (ours - logits(base, inputs)).abs().max() > 1e-4  # the adapters trained
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(
        osp.join(artifact, 'hf_llava')).eval()
    with torch.no_grad():
        exported = hf(**inputs).logits
    real = inputs['attention_mask'].bool()  # padded positions predict nothing
    torch.testing.assert_close(exported[real], ours[real], rtol=0, atol=1e-5)


def test_resume_after_sigterm_is_exact(lora_run, finished, data_root, tmp_path):
    """With lora_dropout > 0 the random state travels with the checkpoint."""
    copy_stages(finished[0], tmp_path)
    cfg = lora_config(tmp_path, data_root, custom_hooks=[dict(type='SignalAt', at=5)])
    with pytest.raises(TrainingInterrupted) as err:
        run_pipeline(cfg, stage='finetune')
    assert err.value.iteration == 6 and err.value.signum == signal.SIGTERM
    [resumed] = run_pipeline(lora_config(tmp_path, data_root), stage='finetune', resume=True)
    reference = lora_run[1]['finetune']
    for key in ('iterations', 'first_loss', 'last_loss'):
        assert resumed[key] == reference[key], key
    for name in LORA_FILES:
        got = load_file(osp.join(resumed['artifact'], name))
        want = load_file(osp.join(reference['artifact'], name))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_full_and_lora_stage3_are_stale_for_each_other(finished, lora_run, data_root):
    """A manifest records its stage config: a LoRA stage 3 is another result."""
    [step] = [s for s in plan_run(lora_config(finished[0], data_root)).stages
              if s.name == 'finetune']
    assert step.state == STALE and 'finetune.lora.r: None -> 8' in step.reason
    [step] = [s for s in plan_run(tiny_config(lora_run[0], data_root)).stages
              if s.name == 'finetune']
    assert step.state == STALE and 'finetune.lora' in step.reason


def test_stages_reused_from_another_work_dir(finished, data_root, tmp_path):
    """The LoRA stage 3 on the proxy and projector of a finished DPA run."""
    cfg = lora_config(tmp_path / 'work', data_root, **{
        'proxy.from_work_dir': str(finished[0]), 'align.from_work_dir': str(finished[0])})
    states = {s.name: s.state for s in plan_run(cfg).stages}
    assert states['proxy'] == states['align'] == REUSED and states['finetune'] == 'new'
    runner_cfg = stage_runner_config(plan_run(cfg).cfg, 'finetune')
    assert runner_cfg.model.projector_weights.startswith(str(finished[0]))
    assert not os.path.exists(tmp_path / 'work' / 'finetune')
