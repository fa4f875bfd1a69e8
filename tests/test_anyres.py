"""Dynamic resolution (AnyRes, LLaVA-NeXT): tiling, variable image tokens
through the dataset, the no-image pass and CMO, training of image_newline, and
the LlavaNextForConditionalGeneration export, on tiny random models."""
import copy
import json
import os.path as osp

import numpy as np
import pytest
import torch
import transformers
from mmengine.config import Config
from PIL import Image
from safetensors.torch import save_file

import dpa  # noqa: F401  (registers everything)
from dpa.datasets.llava import BadSampleError, LLaVADataset, dpa_collate
from dpa.datasets.mixture import LLaVAMixture
from dpa.datasets.samplers import PER_IMAGE, modality_lengths
from dpa.datasets.validation import check_dataset
from dpa.errors import ConfigError
from dpa.engine.preflight import check_config
from dpa.engine.stage_config import stage_dataset_config, stage_runner_config, stage_sampler_config
from dpa.models.anyres import AnyRes, anyres_settings
from dpa.models.builders import PROCESSORS
from dpa.models.export import export_llava, load_native, save_native
from dpa.models.losses import IGNORE_INDEX
from dpa.models.mllm import LlavaDPAModel
from dpa.models.projector import check_projector_file

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = Config.fromfile(osp.join(ROOT, 'configs', 'dpa_tiny_anyres.py'))
TOKENIZER = dict(type='TinyTokenizer')
ANYRES = dict(grid_shapes=[[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]])
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
MESSAGES = [{'role': 'user', 'content': [{'type': 'image'},
                                         {'type': 'text', 'text': 'What colour is the shape?'}]}]
# (width, height): wide, tall, nearly square (2x2 grid, un-padded) and wider than its grid.
SIZES = [(90, 30), (30, 100), (40, 48), (200, 40)]


def llm_cfg(dtype='float32'):
    return dict(TINY.llm.to_dict(), torch_dtype=dtype, attn_implementation='sdpa')


def build_model(loss=None, trainable=('llm', 'projector'), seed=1, dtype='float32'):
    torch.manual_seed(seed)
    model = LlavaDPAModel(llm=llm_cfg(dtype), tokenizer=TOKENIZER,
                          vision_tower=TINY.vision_tower.to_dict(), anyres=ANYRES,
                          loss=loss or dict(type='VisualRelevanceLoss', mode='vanilla'),
                          trainable=trainable)
    # A freshly initialised projector is close to trivial: make the image matter.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.projector.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model.to(getattr(torch, dtype)).eval()


def image(size, seed=0):
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# Tiny matrices gain nothing from intra-op threads on a busy machine.
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def tokenizer():
    return PROCESSORS.build(TOKENIZER)


@pytest.fixture(scope='module')
def clip_processor():
    return PROCESSORS.build(TINY.image_processor.to_dict())


@pytest.fixture(scope='module')
def exported(tmp_path_factory, tokenizer, clip_processor):
    """The tiny model and its export, loaded back as a user would."""
    model = build_model()
    out_dir = str(tmp_path_factory.mktemp('anyres') / 'hf')
    export_llava(model, tokenizer, clip_processor, out_dir)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(out_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(out_dir)
    return dict(model=model, hf=hf, processor=processor, out_dir=out_dir)


def native_logits(model, inputs):
    """Our model on the processor's inputs: tiles concatenated, their sizes."""
    tiles = torch.cat([values[:model.anyres.num_tiles(size.tolist())]
                       for values, size in zip(inputs['pixel_values'], inputs['image_sizes'])])
    with torch.no_grad():
        return model(inputs['input_ids'], inputs['attention_mask'], pixel_values=tiles,
                     image_sizes=inputs['image_sizes'], mode='tensor')


# --------------------------------------------------------------------------- #
# Tiling arithmetic
# --------------------------------------------------------------------------- #

def test_grid_shapes_are_pinpoints_in_tiles_and_max_tiles_filters_them():
    assert AnyRes(32, 8, grid_shapes=ANYRES['grid_shapes']).grid_pinpoints == PINPOINTS
    assert AnyRes(32, 8, grid_pinpoints=PINPOINTS, max_tiles=2).grid_pinpoints == PINPOINTS[:2]
    with pytest.raises(ValueError, match='not positive multiples'):
        AnyRes(32, 8, grid_pinpoints=[[32, 60]])
    with pytest.raises(ValueError, match='one of the two'):
        AnyRes(32, 8)
    with pytest.raises(ValueError, match='max_tiles=1 leaves none'):
        AnyRes(32, 8, grid_pinpoints=PINPOINTS, max_tiles=1)


def test_cls_token_kept_is_refused():
    vision = dict(TINY.vision_tower.to_dict(), feature_select='full')
    with pytest.raises(ValueError, match="feature_select='patch'"):
        LlavaDPAModel(llm=llm_cfg(), tokenizer=TOKENIZER, vision_tower=vision, anyres=ANYRES)


# --------------------------------------------------------------------------- #
# Export: LlavaNextForConditionalGeneration + LlavaNextProcessor
# --------------------------------------------------------------------------- #

def test_export_is_llava_next_with_the_models_settings(exported):
    hf, processor, model = exported['hf'], exported['processor'], exported['model']
    assert isinstance(hf, transformers.LlavaNextForConditionalGeneration)
    assert isinstance(processor, transformers.LlavaNextProcessor)
    assert hf.config.image_grid_pinpoints == PINPOINTS
    assert processor.image_processor.image_grid_pinpoints == PINPOINTS
    assert hf.config.vision_feature_select_strategy == 'default'
    assert torch.equal(hf.model.image_newline, model.projector.image_newline)
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight,
                       model.projector.linear_1.weight)


def test_merge_equals_llava_next_pack_image_features(exported):
    hf, anyres = exported['hf'], exported['model'].anyres
    sizes = torch.tensor([[h, w] for w, h in SIZES])
    counts = [anyres.num_tiles(s) for s in sizes.tolist()]
    features = torch.randn(sum(counts), anyres.side ** 2, 8)
    newline = torch.randn(8)
    ours = anyres.merge(features, sizes, newline)
    theirs, lengths = hf.model.pack_image_features(
        torch.split(features, counts), sizes, 'default', image_newline=newline)
    assert [len(t) for t in ours] == lengths.tolist() == [anyres.num_tokens(s)
                                                          for s in sizes.tolist()]
    assert len(set(lengths.tolist())) == len(SIZES)  # the count depends on the size
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize('size', SIZES[:3], ids=['wide', 'tall', 'squarish'])
def test_exported_logits_equal_native_logits(exported, size):
    processor, model = exported['processor'], exported['model']
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(text=text, images=[image(size)], return_tensors='pt')
    n_image = int((inputs['input_ids'] == model.image_token_id).sum())
    assert n_image == model.anyres.num_tokens(inputs['image_sizes'][0].tolist())
    with torch.no_grad():
        theirs = exported['hf'](**inputs).logits
    ours = native_logits(model, inputs)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # Not blind to the image: another image changes the logits.
    other = processor(text=text, images=[image(size, seed=1)], return_tensors='pt')
    assert (native_logits(model, other) - ours).abs().max() > 1e-2


def test_generate_on_two_differently_sized_images(exported):
    hf, processor, model = exported['hf'], exported['processor'], exported['model']
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    images = [image(SIZES[0]), image(SIZES[1], seed=2)]
    batch = processor(text=[text, text], images=images, return_tensors='pt', padding=True)
    counts = (batch['input_ids'] == model.image_token_id).sum(-1)
    assert counts[0] != counts[1]  # so one row is left-padded
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=4, do_sample=False)
    prompt_len = batch['input_ids'].shape[1]
    for row, img in enumerate(images):
        # Each row's answer is our model's greedy answer for that image alone.
        single = processor(text=text, images=[img], return_tensors='pt')
        ids = single['input_ids']
        for _ in range(4):
            step = dict(single, input_ids=ids, attention_mask=torch.ones_like(ids))
            ids = torch.cat([ids, native_logits(model, step)[:, -1:].argmax(-1)], dim=1)
        assert out[row, prompt_len:].tolist() == ids[0, -4:].tolist()


def test_native_round_trip_keeps_anyres(tmp_path, exported, tokenizer, clip_processor):
    model = exported['model']
    save_native(model, tokenizer, clip_processor, str(tmp_path))
    reloaded = load_native(str(tmp_path)).eval()
    assert reloaded.anyres.grid_pinpoints == PINPOINTS
    inputs = exported['processor'](text='<image>hello', images=[image(SIZES[0])],
                                   return_tensors='pt')
    torch.testing.assert_close(native_logits(reloaded, inputs), native_logits(model, inputs),
                               atol=0, rtol=0)


def test_native_and_exported_anyres_models_evaluate_alike(tmp_path, exported, tokenizer,
                                                          clip_processor):
    """tools/eval.py on an AnyRes model: the native model tiles as training
    did, the LLaVA-NeXT export as its processor does, and they score and
    generate alike on a left-padded batch of images of several sizes."""
    from dpa.evaluation.data import read_eval_rows
    from dpa.evaluation.evaluator import predict
    from dpa.evaluation.models import AnyResImage, load_eval_model, load_image
    save_native(exported['model'], tokenizer, clip_processor, str(tmp_path / 'native'))
    native = load_eval_model(str(tmp_path / 'native'))
    hf = load_eval_model(exported['out_dir'])
    assert (native.kind, hf.kind) == ('native', 'hf_llava')
    rows = []
    for i, size in enumerate(SIZES):
        image(size, seed=i).save(tmp_path / f'{i}.png')
        rows.append(dict(id=f'choice_{i}', image=f'{i}.png', question='What colour is it?',
                         answer='red', options=['red', 'green', 'blue'], type='colour'))
    rows.append(dict(id='open', image='1.png', question='Describe it.', answer='a shape'))
    with open(tmp_path / 'eval.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    rows, problems = read_eval_rows(str(tmp_path / 'eval.jsonl'), str(tmp_path))
    assert not problems
    counts = set()
    for row in rows:
        ours = native.prompt(row['question'], load_image(row['image_path']))
        theirs = hf.prompt(row['question'], load_image(row['image_path']))
        assert ours[0] == theirs[0]  # the same number of <image> ids
        assert isinstance(ours[1], AnyResImage) and isinstance(theirs[1], AnyResImage)
        assert torch.equal(ours[1].tiles, theirs[1].tiles)
        assert torch.equal(ours[1].size, theirs[1].size)
        counts.add(ours[0].count(exported['model'].image_token_id))
    assert len(counts) > 2  # the batch mixes image token counts: rows are left-padded
    a = predict(native, rows, batch_size=5, show_progress=False, max_new_tokens=6)
    b = predict(hf, rows, batch_size=5, show_progress=False, max_new_tokens=6)
    assert [r['prediction'] for r in a] == [r['prediction'] for r in b]
    for x, y in zip(a, b):
        if 'option_scores' in x:
            assert x['option_scores'] == pytest.approx(y['option_scores'], abs=1e-4)
    # Not blind to the images: the rows differ only in their image.
    scores = [json.dumps(r['option_scores']) for r in a if 'option_scores' in r]
    assert len(set(scores)) == len(scores)
    # Batched like the rest: each row scores as it does alone.
    alone = [predict(native, [row], batch_size=1, show_progress=False, max_new_tokens=6)[0]
             for row in rows]
    assert [r['prediction'] for r in alone] == [r['prediction'] for r in a]


def test_chat_with_two_images_of_different_sizes_natively_and_exported(
        tmp_path, exported, tokenizer, clip_processor):
    """tools/chat.py: each image of the conversation gets its own number of
    <image> ids and tiles; the native model and the export answer alike."""
    from dpa.evaluation.chat import ChatSession
    from dpa.evaluation.models import load_eval_model
    save_native(exported['model'], tokenizer, clip_processor, str(tmp_path / 'native'))
    for i, size in enumerate(SIZES[:2]):
        image(size, seed=i).save(tmp_path / f'{i}.png')
    transcripts = {}
    for kind, path in (('native', str(tmp_path / 'native')), ('hf_llava', exported['out_dir'])):
        session = ChatSession(load_eval_model(path), max_new_tokens=4)
        session.attach(str(tmp_path / '0.png'))
        first = session.ask('What is it?')
        session.attach(str(tmp_path / '1.png'))
        ids, pixels = session.prompt('And this one?')
        transcripts[kind] = (first, session.ask('And this one?'), ids)
        assert len(pixels) == 2
        assert [p.size.tolist() for p in pixels] == [[30, 90], [100, 30]]
    model = exported['model']
    ids = transcripts['native'][2]
    assert ids.count(model.image_token_id) == sum(model.anyres.num_tokens(s)
                                                  for s in ([30, 90], [100, 30]))
    assert transcripts['native'] == transcripts['hf_llava']


# --------------------------------------------------------------------------- #
# Dataset, collation, truncation
# --------------------------------------------------------------------------- #

@pytest.fixture
def caption_file(tmp_path):
    rows = []
    for i, size in enumerate(SIZES):
        image(size, seed=i).save(tmp_path / f'{i}.png')
        rows.append(dict(id=i, image=f'{i}.png', conversations=[
            dict(**{'from': 'human'}, value='<image>'),
            dict(**{'from': 'gpt'}, value='a red circle on white')]))
    path = tmp_path / 'captions.json'
    path.write_text(json.dumps(rows))
    return str(path), str(tmp_path)


def anyres_dataset(caption_file, max_length=256):
    data_file, folder = caption_file
    return LLaVADataset(data_files=data_file, image_folder=folder, tokenizer=TOKENIZER,
                        template='plain', image_processor=TINY.image_processor.to_dict(),
                        max_length=max_length,
                        anyres=anyres_settings(ANYRES, TINY.vision_tower.to_dict()))


def test_dataset_tiles_and_counts_as_the_exported_processor(caption_file, exported):
    dataset, processor = anyres_dataset(caption_file), exported['processor']
    for i, size in enumerate(SIZES):
        sample = dataset[i]
        expected = processor(text='<image>', images=[image(size, seed=i)], return_tensors='pt')
        tiles = dataset.anyres.num_tiles(sample['image_size'].tolist())
        assert torch.equal(sample['pixel_values'], expected['pixel_values'][0][:tiles])
        assert sample['image_size'].tolist() == [size[1], size[0]]
        n_image = int((sample['input_ids'] == dataset.image_token_id).sum())
        assert n_image == int((expected['input_ids'] == dataset.image_token_id).sum())


def test_collated_batch_of_different_sizes_trains(caption_file):
    dataset = anyres_dataset(caption_file)
    batch = dpa_collate([dataset[0], dataset[1], dataset[2]])
    assert batch['image_sizes'].tolist() == [[h, w] for w, h in SIZES[:3]]
    assert batch['pixel_values'].shape[0] == sum(
        dataset.anyres.num_tiles(s) for s in batch['image_sizes'].tolist())
    model = build_model(trainable=('projector', ))
    model.train()
    loss = model(**batch)['loss']
    loss.backward()
    # image_newline trains with the projector (stage 2).
    assert model.projector.image_newline.requires_grad
    assert model.projector.image_newline.grad.abs().sum() > 0
    assert 'projector.image_newline' in model.state_dict()


def test_truncation_never_cuts_through_an_image(caption_file):
    dataset = anyres_dataset(caption_file, max_length=60)
    with pytest.raises(BadSampleError, match='beyond max_length=60'):
        dataset.prepare_data(0)  # 68 image tokens
    # check_data's length check counts each image's own tokens: the 42-token
    # image fits, the others do not.
    problems = check_dataset(dataset)
    assert [(p['row'], p['reason']) for p in problems] == [(i, 'too_long') for i in range(3)]


def test_length_grouped_sampler_counts_each_images_tokens(caption_file):
    dataset = anyres_dataset(caption_file)
    image_tokens = [int((dataset[i]['input_ids'] == dataset.image_token_id).sum())
                    for i in range(len(SIZES))]
    assert len(set(image_tokens)) == len(SIZES)
    words = len('<image> a red circle on white'.split())
    lengths, has_image = modality_lengths(dataset, PER_IMAGE)
    assert lengths == [words + n for n in image_tokens] and all(has_image)
    data_file, folder = caption_file
    mixture = LLaVAMixture(sources=dict(a=dict(data_files=data_file, image_folder=folder)),
                           tokenizer=TOKENIZER, template='plain', max_length=256,
                           image_processor=TINY.image_processor.to_dict(),
                           anyres=anyres_settings(ANYRES, TINY.vision_tower.to_dict()))
    assert modality_lengths(mixture, PER_IMAGE)[0] == lengths


# --------------------------------------------------------------------------- #
# The no-image pass with a variable number of image tokens
# --------------------------------------------------------------------------- #

def test_removed_pass_equals_masked_pass_with_variable_image_tokens(caption_file):
    dataset = anyres_dataset(caption_file)

    def after_text(sample):
        # A text token before the image (the tiny tokenizer has no BOS), and the
        # first token after the image unlabelled: the equivalence holds for
        # targets that follow a text token, as in test_model_equivalence.py.
        labels = torch.cat([torch.tensor([IGNORE_INDEX]), sample['labels']])
        labels[int((labels != IGNORE_INDEX).nonzero()[0])] = IGNORE_INDEX
        return dict(sample, input_ids=torch.cat([torch.tensor([5]), sample['input_ids']]),
                    labels=labels)

    text_only = dict(input_ids=torch.arange(5, 17), labels=torch.arange(5, 17),
                     pixel_values=None)
    batch = dpa_collate([after_text(dataset[0]), text_only, after_text(dataset[1]),
                         after_text(dataset[3])])
    loss = dict(type='VisualRelevanceLoss', mode='cmo', clamp=(0.05, 0.5), window=3,
                scope='sequence')
    model = build_model(loss=loss, dtype='float64')
    with torch.no_grad():  # sharper distributions, a stronger image: weights vary
        model.llm.lm_head.weight.mul_(40)
        greedy = model(batch['input_ids'], batch['attention_mask'],
                       pixel_values=batch['pixel_values'].double(),
                       image_sizes=batch['image_sizes'], mode='tensor').argmax(-1)
    labels = batch['labels']
    labels[:, 1:] = torch.where(labels[:, 1:] != IGNORE_INDEX, greedy[:, :-1], labels[:, 1:])
    out = {}
    for text_pass in ('removed', 'masked'):
        model.text_pass = text_pass
        with torch.no_grad():
            out[text_pass] = model(**dict(batch, labels=labels))
    for key in ('loss', 'cmo_w_mean', 'cmo_at_min', 'cmo_at_max', 'cmo_delta_mean'):
        assert abs(out['removed'][key].item() - out['masked'][key].item()) < 1e-9, key
    assert 0 < out['removed']['cmo_at_min'].item() < 1


# --------------------------------------------------------------------------- #
# Pipeline wiring
# --------------------------------------------------------------------------- #

def test_pipeline_gives_anyres_to_model_and_datasets(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg.work_dir = str(tmp_path)
    dataset = stage_dataset_config(cfg, 'align')
    assert dataset['anyres']['tile_size'] == 32 and not dataset['pad_to_square']
    assert 'anyres' not in stage_dataset_config(cfg, 'proxy')
    cfg.finetune.group_by_modality_length = True
    assert stage_sampler_config(cfg, 'finetune')['image_length'] == PER_IMAGE
    assert stage_runner_config(cfg, 'proxy').model.vision_tower is None


def test_anyres_config_mistakes_are_config_errors(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg.merge_from_dict(dict(work_dir=str(tmp_path), pad_to_square=True))
    with pytest.raises(ConfigError, match='pad_to_square=False'):
        check_config(cfg, ['proxy', 'align', 'finetune'])
    cfg.pad_to_square = False
    cfg.anyres = dict(grid_pinpoints=[[30, 60]])
    with pytest.raises(ConfigError, match='not positive multiples'):
        check_config(cfg, ['proxy', 'align', 'finetune'])


def test_projector_of_the_other_image_mode_is_refused(tmp_path):
    path = str(tmp_path / 'projector.safetensors')
    save_file({'linear_1.weight': torch.zeros(64, 64)}, path)  # stage 2 without anyres
    with pytest.raises(ConfigError, match='trained without anyres'):
        check_projector_file(path, TINY.llm, TINY.vision_tower, bool(TINY.get('anyres')))
    save_file({'linear_1.weight': torch.zeros(64, 64), 'image_newline': torch.zeros(64)}, path)
    check_projector_file(path, TINY.llm, TINY.vision_tower, bool(TINY.get('anyres')))
