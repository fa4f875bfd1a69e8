"""The tiny three-stage pipeline end to end: artifacts, skip on re-run, resume
of an interrupted stage, ablation configs, and configuration errors raised
before any model is loaded."""
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from mmengine.hooks import Hook
from safetensors.torch import load_file

import dpa  # noqa: F401
from dpa.artifacts import read_manifest
from dpa.engine.pipeline import run_pipeline
from dpa.engine.stage_config import STAGES
from dpa.engine.summary import format_summary
from dpa.errors import ConfigError
from dpa.models.export import load_native
from dpa.registry import HOOKS

from tiny import REPO, TINY, tiny_config


def test_pipeline_writes_every_stage_artifact(finished):
    work_dir, manifests = finished
    # The tiny default ends with the eval stage (tests/test_eval.py checks it).
    assert [m['stage'] for m in manifests] == ['proxy', 'align', 'finetune', 'eval']
    assert not any(m['skipped'] for m in manifests)
    proxy, align, finetune = manifests[:3]
    assert proxy['iterations'] == 16 and align['iterations'] == 16
    assert finetune['iterations'] == 12  # 48 instruction rows / batch 4
    assert 'cmo' not in proxy and 0.05 <= align['cmo']['w_mean'] <= 0.5
    assert align['made_from']['llm_adapter'] == proxy['artifact']
    assert finetune['made_from']['projector'] == align['artifact']

    adapter = load_file(osp.join(proxy['artifact'], 'adapter_model.safetensors'))
    lora_b = [v for k, v in adapter.items() if 'lora_B' in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), 'LoRA B left at its zero init'
    assert osp.isfile(osp.join(align['artifact'], 'projector.safetensors'))

    final = load_native(finetune['artifact'])
    trained = load_file(osp.join(finetune['artifact'], 'projector.safetensors'))
    aligned = load_file(osp.join(align['artifact'], 'projector.safetensors'))
    assert not torch.equal(trained['linear_1.weight'], aligned['linear_1.weight'])
    assert torch.equal(final.projector.linear_1.weight, trained['linear_1.weight'])
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(
        osp.join(finetune['artifact'], 'hf_llava'))
    assert hf.config.image_token_id == final.image_token_id

    summary = format_summary(manifests)
    for stage in ('proxy', 'align', 'finetune'):
        assert stage in summary
    assert 'CMO weight mean' in summary

    # Where each stage's time went, in its manifest and the summary.
    for m in manifests[:3]:
        seconds = m['seconds']
        assert set(seconds) == {'setup', 'steps', 'checkpoints', 'artifact', 'total'}
        assert seconds['steps'] > 0 and seconds['setup'] > 0 and seconds['artifact'] > 0
        # The tiny recipes checkpoint: its writes are timed apart from the steps.
        assert seconds['checkpoints'] > 0
        assert seconds['total'] == pytest.approx(
            sum(v for k, v in seconds.items() if k != 'total'), abs=0.005)
    assert manifests[3]['seconds']['total'] > 0
    assert summary.count('time ') == 4 and 'checkpoints ' in summary


def test_rerun_skips_finished_stages(finished, data_root):
    work_dir, manifests = finished
    before = {m['stage']: osp.getmtime(osp.join(work_dir, m['stage'], 'manifest.json'))
              for m in manifests}
    again = run_pipeline(tiny_config(work_dir, data_root))
    assert all(m['skipped'] for m in again)
    for m in again:
        assert osp.getmtime(osp.join(work_dir, m['stage'], 'manifest.json')) == before[m['stage']]


@HOOKS.register_module(force=True)
class InterruptAt(Hook):
    """Kills training right after iteration ``at`` (after its checkpoint)."""
    priority = 'LOWEST'

    def __init__(self, at):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.at:
            raise KeyboardInterrupt(f'interrupted after iteration {self.at}')


@pytest.mark.parametrize('stage', ['proxy', 'align', 'finetune'])
def test_resumed_stage_equals_uninterrupted(finished, data_root, tmp_path, stage):
    work_dir, manifests = finished
    for previous in STAGES[:STAGES.index(stage)]:
        shutil.copytree(osp.join(work_dir, previous), tmp_path / previous)
    interrupted = tiny_config(tmp_path, data_root, custom_hooks=[dict(type='InterruptAt', at=11)])
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(interrupted, stage=stage)
    assert read_manifest(str(tmp_path), stage) is None
    assert osp.isfile(tmp_path / stage / 'iter_8.pth')

    resumed = run_pipeline(tiny_config(tmp_path, data_root), stage=stage, resume=True)[0]
    reference = {m['stage']: m for m in manifests}[stage]
    assert resumed['iterations'] == reference['iterations']
    assert resumed['first_loss'] == reference['first_loss']
    assert resumed['last_loss'] == reference['last_loss']
    name = {'proxy': 'adapter_model.safetensors', 'align': 'projector.safetensors',
            'finetune': 'llm/model.safetensors'}[stage]
    got = load_file(osp.join(resumed['artifact'], name))
    want = load_file(osp.join(reference['artifact'], name))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize('ablation, stages, losses', [
    ('vanilla', ['align', 'finetune'], ['vanilla', 'vanilla']),
    ('cal', ['align', 'finetune'], ['cal', 'cal']),
    ('pmo_only', ['proxy', 'align', 'finetune'], ['vanilla', 'vanilla', 'vanilla']),
    ('cmo_only', ['align', 'finetune'], ['cmo', 'cmo']),
    ('reference', ['proxy', 'align', 'finetune'], ['vanilla', 'cmo', 'cmo']),
])
def test_ablation_configs_run(data_root, tmp_path, ablation, stages, losses):
    path = osp.join(REPO, 'configs', 'ablations', f'dpa_tiny_{ablation}.py')
    cfg = tiny_config(tmp_path, data_root, path=path)
    # Ablations that keep the tiny default's stages also end with its eval stage.
    assert [s for s in cfg.stages if s != 'eval'] == stages
    assert [cfg[s].loss.mode for s in stages] == losses
    manifests = run_pipeline(cfg)
    assert [m['stage'] for m in manifests] == list(cfg.stages)
    align = manifests[stages.index('align')]
    assert ('llm_adapter' in align['made_from']) == ('proxy' in stages)
    for manifest, loss in zip(manifests, losses):
        assert ('cmo' in manifest) == (loss != 'vanilla')
    if ablation == 'cal':
        # CAL clamps logit differences to [1, 5]: a random LLM sits at the floor.
        assert manifests[0]['cmo']['w_mean'] == pytest.approx(1.0, abs=1e-3)


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('a model was loaded before the configuration was checked')
    for name in ('from_config', 'from_pretrained'):
        monkeypatch.setattr(transformers.AutoModelForCausalLM, name, refuse)


@pytest.mark.parametrize('overrides, stage, message', [
    ({'align.loss.clamp': [0.5, 0.05]}, None, 'align.loss.clamp'),
    ({'stages': ['proxy', 'alignment']}, None, "unknown stage(s) ['alignment']"),
    ({'stages': ['align', 'proxy']}, None, 'out of order'),
    ({}, 'finetune', "artifact of stage 'align'"),
    ({'synthetic_data': None, 'caption_data.data_files': ['/no/such/captions.json']}, None,
     "caption_data.data_files: '/no/such/captions.json' does not exist"),
    ({'llm.pretrained': '/no/such/llm', 'llm.config': None}, None, 'llm.pretrained'),
    ({'proxy.lora.r': 0}, None, 'proxy.lora.r'),
    ({'align.max_length': 10}, None, 'align.max_length=10'),
    ({'align.global_batch_size': 6}, None, 'align.global_batch_size=6'),
    ({'align.loss.scope': 'reference'}, None, "align.loss.scope='reference' reproduces"),
])
def test_config_errors_fail_before_loading_a_model(no_model_loading, data_root, tmp_path,
                                                   overrides, stage, message):
    cfg = tiny_config(tmp_path, data_root, **overrides)
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg, stage=stage)
    assert message in str(err.value)


def test_cli_reports_config_error_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'train.py'), TINY, '--work-dir', str(tmp_path),
         '--cfg-options', 'finetune.loss.clamp=[0.9,0.1]', f'synthetic_data.root={tmp_path}/d'],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert 'config error: finetune.loss.clamp' in result.stderr
    assert 'Traceback' not in result.stderr
