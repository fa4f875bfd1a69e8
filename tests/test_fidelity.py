"""The switches that reproduce fnlp-vision/DPA (docs/fidelity.md).

The expected sequences below are written out by hand from the reference's
preprocessing (``llava/train/train_dpa.py``: ``preprocess_plain``,
``preprocess_multimodal``, ``preprocess_qwen``, ``preprocess_llama3``,
``preprocess_gemma``; ``llava/conversation.py``), chunk by chunk with each
chunk's label flag; the tokenizer only turns each hand-written chunk into ids.
"""
import json
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from PIL import Image
from transformers import get_cosine_schedule_with_warmup

import dpa  # noqa: F401
from dpa.datasets.llava import LLaVADataset
from dpa.errors import ConfigError
from dpa.engine.preflight import check_config
from dpa.engine.stage_config import stage_dataset_config, stage_pads_images, stage_runner_config
from dpa.engine.schedule import WarmupCosineLR
from dpa.models import LlavaDPAModel
from dpa.models.losses import IGNORE_INDEX

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PROCESSOR = dict(type='HFImageProcessor',
                 config=dict(image_processor_type='CLIPImageProcessor',
                             size=dict(shortest_edge=32), crop_size=dict(height=32, width=32)))
N_IMAGE = 4
IMAGE = object()  # stands for the N_IMAGE expanded <image> ids in an expected sequence
L, M = True, False  # labelled, masked

# <image> after the question: the reference moves it to the turn's start.
ROW = {'image': 'red.png', 'conversations': [
    {'from': 'human', 'value': 'What colour is the shape? <image>'},
    {'from': 'gpt', 'value': 'The shape is red.'},
    {'from': 'human', 'value': 'How many shapes are there?'},
    {'from': 'gpt', 'value': 'There is one shape.'}]}
CAPTION_ROW = {'image': 'red.png', 'conversations': [
    {'from': 'human', 'value': '<image>\nDescribe the image.'},
    {'from': 'gpt', 'value': 'A red circle on a blue background.'}]}

QWEN_CHATML = [  # preprocess_qwen, system_message 'You are a helpful assistant.'
    ('<|im_start|>', L), ('system', M), ('\n', L), ('You are a helpful assistant.', M),
    ('<|im_end|>', L), ('\n', L),
    ('<|im_start|>', L), ('user', M), ('\n', L), (IMAGE, M), ('\n', L),
    ('What colour is the shape?', M), ('<|im_end|>', L), ('\n', L),
    ('<|im_start|>assistant\nThe shape is red.<|im_end|>\n', L),
    ('<|im_start|>', L), ('user', M), ('\n', L), ('How many shapes are there?', M),
    ('<|im_end|>', L), ('\n', L),
    ('<|im_start|>assistant\nThere is one shape.<|im_end|>\n', L),
]
LLAMA3 = [  # preprocess_llama3: its own system message; '\n\n' is not found in the vocabulary
    ('<|begin_of_text|>', L), ('<|start_header_id|>', L), ('system', M), ('<|end_header_id|>', L),
    ('\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are a helpful '
     'language and vision assistant. You are able to understand the visual content that the '
     'user provides, and assist the user with a variety of tasks using natural language.', M),
    ('<|eot_id|>', L),
    ('<|start_header_id|>', L), ('user', M), ('<|end_header_id|>', L), ('\n\n', M), (IMAGE, M),
    ('\nWhat colour is the shape?', M), ('<|eot_id|>', L),
    ('<|start_header_id|>assistant<|end_header_id|>\n\nThe shape is red.<|eot_id|>', L),
    ('<|start_header_id|>', L), ('user', M), ('<|end_header_id|>', L),
    ('\n\nHow many shapes are there?', M), ('<|eot_id|>', L),
    ('<|start_header_id|>assistant<|end_header_id|>\n\nThere is one shape.<|eot_id|>', L),
]
GEMMA = [  # preprocess_gemma with conv_gemma_instruct: no system prompt
    ('<bos>', M), ('<start_of_turn>user\n', M), (IMAGE, M),
    ('\nWhat colour is the shape?<end_of_turn>\n<start_of_turn>model\n', M),
    ('The shape is red.<end_of_turn>\n', L),
    ('<start_of_turn>user\nHow many shapes are there?<end_of_turn>\n<start_of_turn>model\n', M),
    ('There is one shape.<end_of_turn>\n', L),
]


@pytest.fixture
def data(tmp_path):
    Image.new('RGB', (40, 20), (255, 0, 0)).save(tmp_path / 'red.png')
    path = tmp_path / 'rows.json'
    path.write_text(json.dumps([ROW, CAPTION_ROW]))
    return str(tmp_path), str(path)


def dataset(data, template, family=None, **kwargs):
    folder, path = data
    tokenizer = dict(type='TinyTokenizer', **({'family': family} if family else {}))
    return LLaVADataset(data_files=[path], image_folder=folder, tokenizer=tokenizer,
                        template=template, image_processor=PROCESSOR, num_image_tokens=N_IMAGE,
                        **kwargs)


def expected(tokenizer, chunks):
    """Ids and labels of hand-written (text, labelled) chunks."""
    ids, labels = [], []
    for text, labelled in chunks:
        if text is IMAGE:
            piece = [tokenizer.convert_tokens_to_ids('<image>')] * N_IMAGE
        else:
            piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    return ids, labels


def check(ds, row, chunks):
    sample = ds.tokenize(row)
    want_ids, want_labels = expected(ds.tokenizer, chunks)
    assert ds.tokenizer.decode(sample['input_ids']) == ds.tokenizer.decode(want_ids)
    assert sample['input_ids'].tolist() == want_ids
    assert sample['labels'].tolist() == want_labels


# --------------------------------------------------------------------------- #
# Stage 3: the reference's templates and label masking, per family
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize('family, chunks', [
    (None, QWEN_CHATML),  # the tiny default's ChatML tokenizer takes Qwen's format
    ('qwen2_5', QWEN_CHATML),
    ('llama3_1', LLAMA3),
    ('gemma2', GEMMA),
], ids=['tiny', 'qwen2_5', 'llama3_1', 'gemma2'])
def test_reference_stage3_labels(data, family, chunks):
    check(dataset(data, 'chat', family, labels='reference'), ROW, chunks)


def test_reference_labels_train_more_tokens_than_assistant_labels(data):
    """Today's default labels the answers and their end-of-turn token only."""
    ds = dataset(data, 'chat', 'qwen2_5')
    answers = [('The shape is red.<|im_end|>', L), ('There is one shape.<|im_end|>', L)]
    labelled = ds.tokenize(ROW)['labels']
    want = sum(len(ds.tokenizer(t, add_special_tokens=False).input_ids) for t, _ in answers)
    assert int((labelled != IGNORE_INDEX).sum()) == want
    _, reference = expected(ds.tokenizer, QWEN_CHATML)
    assert sum(label != IGNORE_INDEX for label in reference) > 2 * want


def test_reference_labels_reject_internlm2(data):
    with pytest.raises(ValueError, match="Qwen .*Llama-3 and Gemma only.*labels='assistant'"):
        dataset(data, 'chat', 'internlm2', labels='reference')


def test_reference_gemma_system_turn_is_a_bad_row(data):
    ds = dataset(data, 'chat', 'gemma2', labels='reference')
    row = dict(ROW, conversations=[ROW['conversations'][0], ROW['conversations'][1],
                                   {'from': 'system', 'value': 'Be brief.'},
                                   ROW['conversations'][2], ROW['conversations'][3]])
    with pytest.raises(ValueError, match='alternating user/assistant'):
        ds.tokenize(row)


# --------------------------------------------------------------------------- #
# Stages 1 and 2: the caption's ending
# --------------------------------------------------------------------------- #

CAPTION = 'A red circle on a blue background.'


@pytest.mark.parametrize('family, bos, eos', [(None, None, '<|im_end|>'),
                                              ('llama3_1', '<|begin_of_text|>', '<|eot_id|>')])
@pytest.mark.parametrize('suffix', ['eos', '\n'])
@pytest.mark.parametrize('template', ['caption_text', 'plain'])
def test_caption_endings(data, family, bos, eos, suffix, template):
    # preprocess_plain: (BOS) (<image>) caption + conv_llava_plain.sep ('\n'),
    # everything up to the caption masked.
    chunks = [(bos, M)] if bos else []
    if template == 'plain':
        chunks.append((IMAGE, M))
    chunks.append((CAPTION, L))
    chunks.append((eos if suffix == 'eos' else '\n', L))
    check(dataset(data, template, family, caption_suffix=suffix), CAPTION_ROW, chunks)


def test_newline_suffix_keeps_the_caption_as_written(data):
    row = dict(CAPTION_ROW, conversations=[CAPTION_ROW['conversations'][0],
                                           {'from': 'gpt', 'value': CAPTION + ' '}])
    check(dataset(data, 'caption_text', caption_suffix='\n'), row, [(CAPTION + ' \n', L)])
    check(dataset(data, 'caption_text'), row, [(CAPTION, L), ('<|im_end|>', L)])


@pytest.mark.parametrize('key, value', [('caption_suffix', 'eot'), ('labels', 'all')])
def test_dataset_switch_values_are_checked(data, key, value):
    with pytest.raises(ValueError, match=f'{key} must be one of'):
        dataset(data, 'chat', **{key: value})


# --------------------------------------------------------------------------- #
# The first caption token after the image: removed vs masked no-image pass
# --------------------------------------------------------------------------- #

def tiny_model(text_pass):
    torch.manual_seed(0)
    llm = dict(type='HFCausalLM', torch_dtype='float64',
               config=dict(model_type='llama', vocab_size=512, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=False))
    vision = dict(type='HFVisionTower', feature_layer=-2, feature_select='patch',
                  config=dict(model_type='clip_vision_model', hidden_size=64,
                              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8))
    model = LlavaDPAModel(llm=llm, tokenizer=dict(type='TinyTokenizer'), vision_tower=vision,
                          loss=dict(type='VisualRelevanceLoss', mode='cmo', window=1),
                          text_pass=text_pass).double().eval()
    with torch.no_grad():  # sharper distributions, a stronger image
        model.llm.lm_head.weight.mul_(40)
        model.projector.linear_2.weight.mul_(20)
    return model


def test_first_token_after_image_is_scored_differently_by_the_two_passes():
    """The reference's masked pass reads the first caption token's text-only
    score at the last image position, whose input is still the image feature
    (only the attention to image keys is masked); the removed pass reads it at
    the last text token before the image. Every other target gets the same
    text-only score from both passes."""
    image_id, before, after = 3, 2, 6
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(5, 175, (before, ), generator=g).tolist() + [image_id] * 16
            + torch.randint(5, 175, (after, ), generator=g).tolist() for _ in range(2)]
    input_ids = torch.tensor(rows)
    attention_mask = torch.ones_like(input_ids)
    pixel_values = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    # Targets: the image pass's greedy predictions, so that p_img is large and
    # the weights are not all delta_min.
    with torch.no_grad():
        greedy = tiny_model('removed')(input_ids, attention_mask, pixel_values=pixel_values,
                                       mode='tensor').argmax(-1)
    labels = torch.cat([input_ids[:, :1], greedy[:, :-1]], dim=1)
    labels[:, :before + 16] = IGNORE_INDEX  # every caption token, the first included
    scores = {}
    for text_pass in ('removed', 'masked'):
        model = tiny_model(text_pass)
        with torch.no_grad():
            inputs = model.loss_inputs(input_ids, attention_mask, labels, pixel_values)
            scores[text_pass] = model.loss_fn.token_scores(**inputs, score_all_text=True)
            scores[text_pass]['loss'] = model.loss_fn(**inputs)['loss']
    removed, masked = scores['removed'], scores['masked']
    torch.testing.assert_close(removed['score_img'], masked['score_img'], rtol=0, atol=1e-12)
    first = before + 16 - 1  # shifted target index of the first caption token
    supervised = labels[:, 1:] != IGNORE_INDEX
    others = supervised.clone()
    others[:, first] = False
    torch.testing.assert_close(removed['score_txt'][others], masked['score_txt'][others],
                               rtol=0, atol=1e-9)
    gap = (removed['score_txt'][:, first] / masked['score_txt'][:, first]).log().abs()
    assert gap.min() > 0.01, gap
    # By design the losses then differ (window=1: only through that token).
    assert abs(removed['loss'].item() - masked['loss'].item()) > 1e-9


# --------------------------------------------------------------------------- #
# Warm-up: transformers' schedule, in optimizer steps
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize('iterations, accumulation, ratio, warned', [
    (40, 1, 0.1, None), (2, 2, 0.03, 'its only step runs at lr 0: nothing trains'),
    (4, 2, 0.6, 'the lr rises from 0 to 50% of its base value and no higher')])
def test_a_run_inside_its_warmup_is_warned(monkeypatch, iterations, accumulation, ratio, warned):
    import dpa.engine.schedule as schedule
    messages = []
    monkeypatch.setattr(schedule, 'print_log', lambda message, **kwargs: messages.append(message))
    WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                   warmup_ratio=ratio, accumulation=accumulation, begin=0, end=iterations,
                   by_epoch=False)
    if warned is None:
        assert messages == []
    else:
        [message] = messages
        assert warned in message and 'warmup_ratio=0' in message


@pytest.mark.parametrize('iterations, accumulation, ratio',
                         [(40, 1, 0.1), (40, 4, 0.1), (37, 4, 0.03), (9, 2, 0.5)])
def test_warmup_cosine_is_transformers_schedule(iterations, accumulation, ratio):
    param = torch.nn.Parameter(torch.zeros(1))
    ours = WarmupCosineLR(torch.optim.SGD([param], lr=1.0), warmup_ratio=ratio,
                          accumulation=accumulation, begin=0, end=iterations, by_epoch=False)
    steps = math.ceil(iterations / accumulation)  # mmengine steps on the last partial window
    hf_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(hf_opt, math.ceil(ratio * steps), steps)
    for iteration in range(iterations):
        lr = ours.optimizer.param_groups[0]['lr']
        if (iteration + 1) % accumulation == 0 or iteration + 1 == iterations:
            # The lr of the optimizer step taken at this micro-iteration.
            assert lr == pytest.approx(hf_opt.param_groups[0]['lr'], abs=1e-12), iteration
            hf_opt.step()
            hf.step()
        ours.step()
    assert hf_opt.param_groups[0]['lr'] == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- #
# The recipe switches and the reference configs
# --------------------------------------------------------------------------- #

def tiny_config(name='dpa_tiny.py', **options):
    cfg = Config.fromfile(osp.join(REPO, 'configs', *name.split('/')))
    cfg.merge_from_dict(options)
    return cfg


def test_reference_configs_set_every_switch():
    for name in ('ablations/dpa_tiny_reference.py', 'ablations/dpa_qwen2_5_7b_reference.py'):
        cfg = tiny_config(name)
        assert cfg.model.text_pass == 'masked'
        assert cfg.proxy.caption_suffix == cfg.align.caption_suffix == '\n'
        assert (cfg.align.image_mode, cfg.finetune.image_mode) == ('square', 'pad')
        assert cfg.finetune.labels == 'reference'
        assert cfg.align.loss.scope == cfg.finetune.loss.scope == 'reference'
    cfg = tiny_config('dpa_qwen2_5_7b.py')  # the reference's per-device sizes
    assert [(cfg[s].batch_size, cfg[s].max_length, cfg[s].global_batch_size)
            for s in ('proxy', 'align', 'finetune')] == [(16, 8192, 256), (32, 8192, 256),
                                                         (8, 2048, 256)]


def test_stage_datasets_get_the_switches(tmp_path):
    cfg = tiny_config('ablations/dpa_tiny_reference.py', work_dir=str(tmp_path))
    assert stage_dataset_config(cfg, 'proxy')['caption_suffix'] == '\n'
    align = stage_dataset_config(cfg, 'align')
    assert align['caption_suffix'] == '\n' and align['pad_to_square'] is False
    assert not stage_pads_images(cfg, 'align') and stage_pads_images(cfg, 'finetune')
    finetune = stage_dataset_config(cfg, 'finetune')
    assert finetune['labels'] == 'reference' and finetune['pad_to_square'] is True
    # The final model's processors pad exactly when stage 3 padded.
    hook = stage_runner_config(cfg, 'proxy').custom_hooks[0]
    assert hook.type == 'DPAHook' and hook.pad_to_square is True
    cfg.merge_from_dict({'pad_to_square': False, 'finetune.image_mode': None})
    assert stage_runner_config(cfg, 'proxy').custom_hooks[0].pad_to_square is False
    default = tiny_config()
    assert stage_dataset_config(default, 'align')['pad_to_square'] is True  # pad_to_square
    assert stage_dataset_config(default, 'finetune')['labels'] == 'assistant'


@pytest.mark.parametrize('options, message', [
    ({'finetune.labels': 'everything'}, "finetune.labels='everything': choose among"),
    ({'align.image_mode': 'crop'}, "align.image_mode='crop': choose among"),
    ({'proxy.image_mode': 'pad'}, 'proxy.image_mode does not apply to the proxy stage'),
    ({'finetune.image_mode': 'square'}, "finetune.image_mode='square' disagrees with "
     'pad_to_square=True'),
])
def test_switch_mistakes_are_config_errors(options, message, tmp_path):
    cfg = tiny_config(work_dir=str(tmp_path), **options)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, ['proxy', 'align', 'finetune'])
