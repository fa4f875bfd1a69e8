"""What each LLM family does, checked on the tiny stand-ins its configs use
(``llm_standin`` of configs/_base_/models/): the loss path honours its logits
and embeddings, the no-image pass equals the masked pass, stage 3 supervises
exactly the assistant turns under its real chat template, its LLaVA export
renders that template and generates, generation with the KV cache equals full
passes, every stand-in is loaded from disk like a checkpoint, and InternLM2
loads offline without running a checkpoint's code unless asked to."""
import json
import os
import os.path as osp
import shutil

import jinja2
import pytest
import torch
import transformers
from mmengine.config import Config
from PIL import Image, ImageDraw

import dpa  # noqa: F401  (registers everything)
from dpa.datasets.llava import LLaVADataset, dpa_collate
from dpa.datasets.packing import packed_collate
from dpa.errors import ConfigError
from dpa.engine.pipeline import run_pipeline
from dpa.engine.standin import make_tiny
from dpa.models.builders import IMAGE_TOKEN, PROCESSORS
from dpa.models.chat_templates import FAMILIES, chat_family
from dpa.models import export
from dpa.models.export import export_llava, load_native, save_native
from dpa.models.export_base import ExportUnsupported
from dpa.models.internlm2 import InternLM2ForCausalLM, modeling_internlm2
from dpa.models.losses import IGNORE_INDEX
from dpa.models.mllm import LlavaDPAModel
from dpa.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODEL_BASES = osp.join(REPO, 'configs', '_base_', 'models')
# Chat family -> the model base file whose stand-in it is.
FAMILY_BASES = {
    'qwen2_5': 'qwen2_5_7b_instruct.py',
    'llama3_1': 'llama3_1_8b_instruct.py',
    'gemma2': 'gemma2_9b_it.py',
    'internlm2': 'internlm2_chat_7b.py',
}
NATIVE = ['qwen2_5', 'llama3_1', 'gemma2']
VISION_BASES = {'clip': 'clip_vit_l14_336.py', 'siglip': 'siglip_so400m_p14_384.py'}
NUM_IMAGE_TOKENS = 16  # the stand-ins' 32 px images in 8 px patches
QUESTION = 'What colour is the shape?'
ROWS = [
    {'id': 'image', 'image': 'red.png', 'conversations': [
        {'from': 'human', 'value': '<image>\n' + QUESTION},
        {'from': 'gpt', 'value': 'The shape is red.'},
        {'from': 'human', 'value': 'How many shapes are there?'},
        {'from': 'gpt', 'value': 'There is one shape.'}]},
    {'id': 'text', 'conversations': [
        {'from': 'human', 'value': 'What is 2 plus 3?'},
        {'from': 'gpt', 'value': '2 plus 3 is 5.'}]},
]
ANSWERS = [['The shape is red.', 'There is one shape.'], ['2 plus 3 is 5.']]


# Tiny matrices gain nothing from intra-op threads on a busy machine.
pytestmark = pytest.mark.usefixtures('one_thread')


def standin(base_file: str) -> Config:
    return make_tiny(Config.fromfile(osp.join(MODEL_BASES, base_file)))


def family_llm(family, dtype='float64'):
    return {**standin(FAMILY_BASES[family]).llm, 'torch_dtype': dtype}


def family_tokenizer(family):
    return standin(FAMILY_BASES[family]).tokenizer


def vision_parts(vision='clip'):
    tiny = standin(VISION_BASES[vision])
    return tiny.vision_tower, tiny.image_processor


def build_model(family, vision='clip', loss=None, dtype='float64', seed=1):
    torch.manual_seed(seed)  # the projector draws from the global generator
    model = LlavaDPAModel(llm=family_llm(family, dtype), tokenizer=family_tokenizer(family),
                          vision_tower=vision_parts(vision)[0],
                          loss=loss or dict(type='VisualRelevanceLoss', mode='vanilla'),
                          trainable=['llm', 'projector'])
    if dtype == 'float64':
        model.double()
    return model.eval()


def shape_image(colour='red', size=(40, 48)):
    image = Image.new('RGB', size, 'white')
    ImageDraw.Draw(image).ellipse((8, 10, 30, 36), fill=colour)
    return image


@pytest.fixture(scope='module')
def rows_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp('family_rows')
    shape_image().save(folder / 'red.png')
    path = folder / 'rows.jsonl'
    path.write_text('\n'.join(json.dumps(row) for row in ROWS))
    return str(path), str(folder)


def chat_dataset(family, rows_file, vision='clip'):
    path, folder = rows_file
    return LLaVADataset(data_files=[path], image_folder=folder, template='chat',
                        tokenizer=family_tokenizer(family),
                        image_processor=vision_parts(vision)[1],
                        num_image_tokens=NUM_IMAGE_TOKENS, max_length=1024)


def supervised_runs(tokenizer, labels):
    """The supervised tokens, decoded, one string per contiguous run."""
    runs, current = [], []
    for label in labels.tolist() + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(label)
    return runs


# --------------------------------------------------------------------------- #
# Chat templates and stage-3 tokenisation
# --------------------------------------------------------------------------- #

GENERATION_PROMPT = {'qwen2_5': '<|im_start|>assistant\n',
                     'llama3_1': '<|start_header_id|>assistant<|end_header_id|>\n\n',
                     'gemma2': '<start_of_turn>model\n', 'internlm2': '<|im_start|>assistant\n'}
RENDERED = {
    'qwen2_5': ('<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful '
                'assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
                '<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n'),
    'llama3_1': ('<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n'
                 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>'
                 '<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>'
                 '<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>'
                 '<|start_header_id|>assistant<|end_header_id|>\n\n'),
    'gemma2': ('<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.'
               '<end_of_turn>\n<start_of_turn>model\n'),
    'internlm2': ('<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n'
                  '<|im_start|>assistant\n'),
}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_standin_tokenizer_renders_the_family_chat_format(family):
    tokenizer = PROCESSORS.build(family_tokenizer(family))
    messages = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == RENDERED[family]
    assert text.endswith(GENERATION_PROMPT[family])
    ids = tokenizer(text, add_special_tokens=False).input_ids
    chat = chat_family(family)
    for token in (chat.end_of_turn, chat.eos, chat.bos) + chat.special_tokens:
        if token is not None:
            assert tokenizer.convert_tokens_to_ids(token) in tokenizer.all_special_ids, token
    assert tokenizer.decode(ids) == text  # special tokens are single ids, text round-trips
    assert tokenizer.eos_token == chat.eos and tokenizer.bos_token == chat.bos


def test_gemma2_template_rejects_system_turns():
    tokenizer = PROCESSORS.build(family_tokenizer('gemma2'))
    with pytest.raises(jinja2.TemplateError, match='System role not supported'):
        tokenizer.apply_chat_template([{'role': 'system', 'content': 'Be brief.'},
                                       {'role': 'user', 'content': 'Hi'}], tokenize=False)


def test_a_row_the_template_rejects_is_a_bad_sample(tmp_path):
    from dpa.datasets.llava import BadSampleError
    system_row = {'id': 'sys', 'conversations': [
        {'from': 'system', 'value': 'Be brief.'}, *ROWS[1]['conversations']]}
    path = tmp_path / 'rows.jsonl'
    path.write_text('\n'.join(json.dumps(row) for row in (system_row, ROWS[1])))
    dataset = chat_dataset('gemma2', (str(path), str(tmp_path)))
    with pytest.raises(BadSampleError, match='System role not supported') as err:
        dataset.prepare_data(0)
    assert err.value.reason == 'template_mismatch'
    sample = dataset[0]  # training skips it to the next good row and says so
    assert [s['reason'] for s in sample['skipped']] == ['template_mismatch']
    assert supervised_runs(dataset.tokenizer, sample['labels'])[0].startswith('2 plus 3 is 5.')


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_chat_tokenisation_supervises_answers_and_end_of_turn(family, rows_file):
    dataset = chat_dataset(family, rows_file)
    tokenizer = dataset.tokenizer
    end_of_turn = chat_family(family).end_of_turn
    for index, answers in enumerate(ANSWERS):
        sample = dataset.prepare_data(index)
        assert supervised_runs(tokenizer, sample['labels']) == [a + end_of_turn for a in answers]
        ids = sample['input_ids']
        image_positions = (ids == dataset.image_token_id).nonzero().squeeze(-1)
        assert image_positions.numel() == (NUM_IMAGE_TOKENS if index == 0 else 0)
        if index == 0:  # one unsupervised block, right after the first user header
            assert torch.equal(image_positions, image_positions[0] + torch.arange(NUM_IMAGE_TOKENS))
            assert (sample['labels'][image_positions] == IGNORE_INDEX).all()
            assert tokenizer.decode(ids[:image_positions[0]]) == RENDERED[family].split('Hi')[0]


# --------------------------------------------------------------------------- #
# The loss path honours each family's logits and embeddings
# --------------------------------------------------------------------------- #

def image_and_text_batch(family, rows_file):
    dataset = chat_dataset(family, rows_file)
    batch = dpa_collate([dataset.prepare_data(0), dataset.prepare_data(1)])
    batch['pixel_values'] = batch['pixel_values'].double()
    return batch


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_vanilla_loss_equals_the_models_own_loss(family, rows_file):
    model = build_model(family)
    batch = image_and_text_batch(family, rows_file)
    ids, mask, labels = batch['input_ids'], batch['attention_mask'], batch['labels']
    with torch.no_grad():
        ours = model(ids, mask, labels, batch['pixel_values'])['loss']
        embeds, _ = model.embed(ids, batch['pixel_values'])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           labels=labels, use_cache=False).loss
        # The text-only row through the model's own embedding of its ids.
        text_ours = model(ids[1:], mask[1:], labels[1:])['loss']
        text_theirs = model.llm(input_ids=ids[1:], attention_mask=mask[1:], labels=labels[1:],
                                use_cache=False).loss
    assert torch.isfinite(ours)
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert abs(text_ours.item() - text_theirs.item()) < 1e-5


def test_gemma2_standin_keeps_the_family_computation():
    llm = MODELS.build(family_llm('gemma2'))
    config = llm.config
    assert config.final_logit_softcapping == 30.0 and config.attn_logit_softcapping == 50.0
    assert config.tie_word_embeddings
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    assert 'sliding_attention' in config.layer_types
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        logits = llm(input_ids=ids).logits
        hidden = llm.get_decoder()(input_ids=ids).last_hidden_state
        raw = llm.get_output_embeddings()(hidden)
        # Embedding scaling: the decoder multiplies embeddings by sqrt(hidden).
        scaled = llm.get_decoder()(inputs_embeds=llm.get_input_embeddings()(ids)).last_hidden_state
    assert torch.allclose(torch.tanh(raw / 30.0) * 30.0, logits, atol=1e-10)
    assert not torch.allclose(raw, logits)
    assert torch.allclose(hidden, scaled)


def greedy_labels(model, batch):
    """Labels that the image makes likely: the model's own greedy tokens at
    the supervised positions, so the CMO weights spread between the bounds."""
    with torch.no_grad():
        greedy = model(batch['input_ids'], batch['attention_mask'],
                       pixel_values=batch['pixel_values'], mode='tensor').argmax(-1)
    labels = batch['labels'].clone()
    supervised = labels[:, 1:] != IGNORE_INDEX
    labels[:, 1:] = torch.where(supervised, greedy[:, :-1], labels[:, 1:])
    return labels


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_no_image_pass_equals_masked_pass(family, rows_file):
    # A floor of 0: the random stand-ins' image effects are small, this keeps
    # the weights from all sitting at the paper's 0.05.
    loss = dict(type='VisualRelevanceLoss', mode='cmo', clamp=(0.0, 0.5), window=3,
                scope='sequence')
    model = build_model(family, loss=loss)
    with torch.no_grad():  # sharper distributions, a stronger image: weights vary
        model.llm.get_output_embeddings().weight.mul_(40)
        model.projector.linear_2.weight.mul_(20)
    batch = image_and_text_batch(family, rows_file)
    labels = greedy_labels(model, batch)
    out = {}
    for text_pass in ('removed', 'masked'):
        model.text_pass = text_pass
        with torch.no_grad():
            out[text_pass] = model(batch['input_ids'], batch['attention_mask'], labels,
                                   batch['pixel_values'])
    for key in ('loss', 'cmo_w_mean', 'cmo_at_min', 'cmo_at_max', 'cmo_delta_mean'):
        assert abs(out['removed'][key].item() - out['masked'][key].item()) < 1e-9, key
    assert 0 < out['removed']['cmo_at_min'].item() < 1, 'weights all at one bound: blind test'


def test_sliding_window_shorter_than_samples_is_refused(tmp_path):
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'dpa_gemma2_9b.py'))
    cfg.merge_from_dict({'work_dir': str(tmp_path), 'tiny_standin': True,
                         'standin_data_root': str(tmp_path / 'data'),
                         'llm_standin.config.sliding_window': 1024})
    with pytest.raises(ConfigError, match='sliding window of 1024 tokens'):
        run_pipeline(cfg)


# --------------------------------------------------------------------------- #
# Packing needs an LLM that reads position-id restarts as sample boundaries
# --------------------------------------------------------------------------- #

FULL_CONFIGS = {'qwen2_5': 'dpa_qwen2_5_7b.py', 'llama3_1': 'dpa_llama3_1_8b.py',
                'gemma2': 'dpa_gemma2_9b.py', 'internlm2': 'dpa_internlm7b.py'}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_proxy_packs_only_where_the_llm_keeps_samples_apart(family, rows_file):
    cfg = Config.fromfile(osp.join(REPO, 'configs', FULL_CONFIGS[family]))
    path, folder = rows_file
    dataset = LLaVADataset(data_files=[path], image_folder=folder, template='caption_text',
                           tokenizer=family_tokenizer(family))
    samples = [dataset.prepare_data(0), dataset.prepare_data(1)]
    model = build_model(family)
    padded, packed = dpa_collate(samples), packed_collate(samples, pack_length=64)
    assert packed['input_ids'].shape[0] == 1  # both samples in one row
    with torch.no_grad():
        padded_loss = model(padded['input_ids'], padded['attention_mask'], padded['labels'])
        packed_loss = model(packed['input_ids'], None, packed['labels'],
                            position_ids=packed['position_ids'])
    keeps_apart = abs(padded_loss['loss'].item() - packed_loss['loss'].item()) < 1e-9
    # Every family, InternLM2 included since it runs on the project's own
    # implementation (its checkpoint's code ignores the restarts).
    assert keeps_apart
    assert cfg.proxy.pack == keeps_apart


# --------------------------------------------------------------------------- #
# The transformers LLaVA export of each native family
# --------------------------------------------------------------------------- #

def softcap(logits, cap):
    return logits if cap is None else torch.tanh(logits / cap) * cap


@pytest.mark.parametrize('family, vision', [(f, 'clip') for f in NATIVE]
                         + [('qwen2_5', 'siglip')])
def test_export_renders_the_family_template_and_generates(family, vision, tmp_path,
                                                          monkeypatch):
    warnings = []
    monkeypatch.setattr(export, 'print_log', lambda msg, **kwargs: warnings.append(msg))
    model = build_model(family, vision=vision, dtype='float32')
    with torch.no_grad():  # a projector far from its init, logits large enough to be capped
        for param in model.projector.parameters():
            param.mul_(20)
        model.llm.get_output_embeddings().weight.mul_(40)
    tokenizer = PROCESSORS.build(family_tokenizer(family))
    image_processor = PROCESSORS.build(vision_parts(vision)[1])
    export_llava(model, tokenizer, image_processor, str(tmp_path / 'hf'))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / 'hf')).eval()
    processor = transformers.AutoProcessor.from_pretrained(str(tmp_path / 'hf'))

    messages = [{'role': 'user', 'content': [{'type': 'image'},
                                             {'type': 'text', 'text': QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    flattened = tokenizer.apply_chat_template(
        [{'role': 'user', 'content': IMAGE_TOKEN + '\n' + QUESTION}],
        add_generation_prompt=True, tokenize=False)
    assert prompt == flattened
    assert IMAGE_TOKEN + '\n' + QUESTION + chat_family(family).end_of_turn in prompt
    assert prompt.endswith(GENERATION_PROMPT[family])

    inputs = processor(text=prompt, images=[shape_image()], return_tensors='pt')
    assert int((inputs['input_ids'] == model.image_token_id).sum()) == NUM_IMAGE_TOKENS
    with torch.no_grad():
        ours = model(inputs['input_ids'], inputs['attention_mask'],
                     pixel_values=inputs['pixel_values'], mode='tensor')
        theirs = hf(**inputs).logits
        out = hf.generate(**inputs, max_new_tokens=3, do_sample=False)
    # LlavaForConditionalGeneration applies no final logit soft-capping
    # (Gemma-2): the exported logits are the capped ones' pre-images, so
    # greedy decoding is the same.
    cap = getattr(model.llm.config.get_text_config(), 'final_logit_softcapping', None)
    assert torch.allclose(softcap(theirs, cap), ours, rtol=1e-4, atol=1e-4)
    if cap is not None:
        assert (theirs - ours).abs().max() > 1e-3
    assert any('does not' in w for w in warnings) == (cap is not None)
    prompt_len = inputs['input_ids'].shape[1]
    assert out.shape[1] > prompt_len
    assert torch.equal(out[:, :prompt_len], inputs['input_ids'])
    assert int(out[0, prompt_len]) == int(ours[0, -1].argmax())


# --------------------------------------------------------------------------- #
# Stand-ins load like checkpoints; generation with the KV cache; positions
# beyond the compact length
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_standins_are_loaded_from_disk(family):
    llm = MODELS.build(family_llm(family))
    tokenizer = PROCESSORS.build(family_tokenizer(family))
    vision = MODELS.build(vision_parts()[0]).model
    for part in (llm.config, tokenizer, vision.config):
        # from_pretrained records the directory it read; it stays, as a checkpoint does
        assert osp.basename(part.name_or_path).startswith('dpa-standin-'), part
        assert osp.isfile(osp.join(part.name_or_path, 'config.json' if part is not tokenizer
                                   else 'tokenizer_config.json'))
    # Built again (another stage, another rank): the same saved directory.
    assert MODELS.build(family_llm(family)).config.name_or_path == llm.config.name_or_path
    assert type(tokenizer).__name__ == 'TokenizersBackend'
    if family == 'internlm2':
        assert type(llm) is InternLM2ForCausalLM


def test_saved_standins_are_shared_and_complete(tmp_path, monkeypatch):
    from dpa.models import standin_checkpoint
    tokenizer = PROCESSORS.build(family_tokenizer('internlm2'))
    monkeypatch.setenv(standin_checkpoint.CACHE_ENV, str(tmp_path))
    loads = []

    def load(directory):
        loads.append(directory)
        return sorted(os.listdir(directory))

    first = standin_checkpoint.reload_as_checkpoint(tokenizer, load)
    second = standin_checkpoint.reload_as_checkpoint(tokenizer, load)
    assert first == second and 'tokenizer.json' in first
    assert loads[0] == loads[1] and osp.dirname(loads[0]) == str(tmp_path)
    assert os.listdir(tmp_path) == [osp.basename(loads[0])]  # no staging left behind


def generation_inputs(family):
    """Two chat prompts, the second left-padded as batched generation pads."""
    tokenizer = PROCESSORS.build(family_tokenizer(family))
    prompts = [[{'role': 'user', 'content': 'What colour is the shape?'}],
               [{'role': 'user', 'content': 'Hi'}]]
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
             for p in prompts]
    tokenizer.padding_side = 'left'
    return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors='pt')


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_generation_with_cache_equals_full_passes(family):
    llm = MODELS.build(family_llm(family, dtype='float32')).eval()
    if not llm.config.get_text_config().tie_word_embeddings:
        with torch.no_grad():  # sharper logits, varied greedy tokens
            llm.get_output_embeddings().weight.mul_(40)
    inputs = generation_inputs(family)
    new = 8
    kwargs = dict(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    cached = llm.generate(use_cache=True, **kwargs)
    uncached = llm.generate(use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(set(cached.sequences[:, -new:].flatten().tolist())) > 1  # not one token
    prompt_len = inputs['input_ids'].shape[1]
    mask = torch.cat([inputs['attention_mask'], torch.ones(2, new, dtype=torch.long)], 1)
    with torch.no_grad():
        full = llm(input_ids=cached.sequences, attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
    for step, logits in enumerate(cached.logits):
        assert torch.allclose(logits, full[:, prompt_len - 1 + step], atol=1e-4), step
    # From embeddings, as LLaVA generates.
    embeds = llm.get_input_embeddings()(inputs['input_ids'])
    from_embeds = llm.generate(inputs_embeds=embeds, **{k: v for k, v in kwargs.items()
                                                        if k != 'input_ids'})
    assert torch.equal(from_embeds.sequences, cached.sequences[:, prompt_len:])


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_positions_beyond_the_compact_length(family, rows_file):
    """The no-image pass: the text tokens alone, at their original positions,
    give the full pass's logits with the image tokens masked out."""
    llm = MODELS.build(family_llm(family)).eval()
    batch = image_and_text_batch(family, rows_file)
    ids, mask = batch['input_ids'][:1], batch['attention_mask'][:1]
    image = ids[0] == PROCESSORS.build(family_tokenizer(family)).convert_tokens_to_ids(IMAGE_TOKEN)
    keep = (~image & mask[0].bool()).nonzero().squeeze(-1)
    assert keep.max() >= len(keep)  # positions beyond the compact length
    safe_ids = ids.masked_fill(image.unsqueeze(0), 0)
    with torch.no_grad():
        masked = llm(input_ids=safe_ids, attention_mask=mask.masked_fill(image.unsqueeze(0), 0),
                     position_ids=torch.arange(ids.shape[1]).unsqueeze(0),
                     use_cache=False).logits[0, keep]
        compact = llm(input_ids=ids[:, keep], attention_mask=torch.ones(1, len(keep),
                                                                        dtype=torch.long),
                      position_ids=keep.unsqueeze(0), use_cache=False).logits[0]
    assert (compact - masked).abs().max() < 1e-9


# --------------------------------------------------------------------------- #
# InternLM2 checkpoints: no checkpoint code runs unless asked, and an export
# that says no
# --------------------------------------------------------------------------- #

TINY_INTERNLM2 = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bias=False, rope_theta=1000000)
AUTO_MAP = {'AutoConfig': 'configuration_internlm2.InternLM2Config',
            'AutoModel': 'modeling_internlm2.InternLM2ForCausalLM',
            'AutoModelForCausalLM': 'modeling_internlm2.InternLM2ForCausalLM'}


@pytest.fixture(scope='module')
def internlm2_checkpoint(tmp_path_factory):
    """A local checkpoint laid out like the published ones: config.json with
    ``auto_map``, the checkpoint's own code (here a copy of the project's
    modules), random weights, the stand-in tokenizer."""
    out = tmp_path_factory.mktemp('internlm2') / 'tiny-internlm2'
    torch.manual_seed(3)
    model = InternLM2ForCausalLM(transformers.AutoConfig.for_model('internlm2', **TINY_INTERNLM2))
    model.save_pretrained(str(out))
    source = osp.dirname(modeling_internlm2.__file__)
    for name in ('configuration_internlm2.py', 'modeling_internlm2.py'):
        shutil.copy(osp.join(source, name), out / name)
    config = json.loads((out / 'config.json').read_text())
    (out / 'config.json').write_text(json.dumps({**config, 'auto_map': AUTO_MAP}))
    PROCESSORS.build(family_tokenizer('internlm2')).save_pretrained(str(out))
    return str(out), {k: v.clone() for k, v in model.state_dict().items()}


def test_internlm2_checkpoint_loads_offline_without_its_code(internlm2_checkpoint):
    path, weights = internlm2_checkpoint
    for options in (dict(), dict(trust_remote_code=True),
                    dict(trust_remote_code=True, use_checkpoint_code=True)):
        llm = MODELS.build(dict(type='HFCausalLM', pretrained=path, **options))
        uses_its_code = options.get('use_checkpoint_code', False)
        assert (type(llm) is InternLM2ForCausalLM) != uses_its_code, options
        assert type(llm).__name__ == 'InternLM2ForCausalLM'
        loaded = llm.state_dict()
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert 'model.layers.0.attention.wqkv.weight' in loaded  # InternLM2's fused layout


def test_internlm2_model_keeps_the_native_format_only(internlm2_checkpoint, tmp_path):
    path, _ = internlm2_checkpoint
    tokenizer_cfg = dict(type='HFTokenizer', pretrained=path)
    torch.manual_seed(0)
    model = LlavaDPAModel(llm=dict(type='HFCausalLM', pretrained=path),
                          tokenizer=tokenizer_cfg, vision_tower=vision_parts()[0]).eval()
    tokenizer = PROCESSORS.build(tokenizer_cfg)
    image_processor = PROCESSORS.build(vision_parts()[1])
    unsupported = r'InternLM2ForCausalLM is not a transformers-native LLM \(dpa code\)'
    with pytest.raises(ExportUnsupported, match=unsupported):
        export_llava(model, tokenizer, image_processor, str(tmp_path / 'hf'))
    assert not (tmp_path / 'hf').exists()

    save_native(model, tokenizer, image_processor, str(tmp_path / 'native'))
    saved = json.loads((tmp_path / 'native' / 'llm' / 'config.json').read_text())
    assert 'auto_map' not in saved  # names no code the directory does not ship
    rebuilt = load_native(str(tmp_path / 'native')).eval()
    assert type(rebuilt.llm) is InternLM2ForCausalLM
    ids = torch.tensor([[1, 40] + [model.image_token_id] * NUM_IMAGE_TOKENS + [41, 42]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids, torch.ones_like(ids), pixel_values=pixels, mode='tensor')
        got = rebuilt(ids, torch.ones_like(ids), pixel_values=pixels, mode='tensor')
    assert torch.equal(got, want)
