"""Tokenisation of LLaVA rows for the three stage templates, and collation."""
import json

import pytest
import torch
from PIL import Image

import dpa  # noqa: F401
from dpa.datasets.llava import BadSampleError, LLaVADataset, dpa_collate, expand_to_square
from dpa.models.builders import PROCESSORS
from dpa.models.losses import IGNORE_INDEX

TOKENIZER = dict(type='TinyTokenizer')
PROCESSOR = dict(type='HFImageProcessor',
                 config=dict(image_processor_type='CLIPImageProcessor',
                             size=dict(shortest_edge=32), crop_size=dict(height=32, width=32)))
N_IMAGE = 16


@pytest.fixture(scope='module')
def tokenizer():
    return PROCESSORS.build(TOKENIZER)


@pytest.fixture
def data(tmp_path):
    Image.new('RGB', (40, 20), (255, 0, 0)).save(tmp_path / 'red.png')
    rows = [
        {'id': 'a', 'image': 'red.png', 'conversations': [
            {'from': 'human', 'value': '<image>\nWhat colour is the shape?'},
            {'from': 'gpt', 'value': 'The shape is red.'},
            {'from': 'human', 'value': 'How many shapes are there?'},
            {'from': 'gpt', 'value': 'There is one shape.'}]},
        {'id': 'b', 'conversations': [
            {'from': 'human', 'value': 'What is 2 plus 3?'},
            {'from': 'gpt', 'value': '2 plus 3 is 5.'}]},
    ]
    path = tmp_path / 'rows.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in rows))
    return tmp_path, str(path)


def dataset(data, template, **kwargs):
    folder, path = data
    args = dict(data_files=[path], image_folder=str(folder), tokenizer=TOKENIZER,
                template=template, image_processor=PROCESSOR, num_image_tokens=N_IMAGE)
    args.update(kwargs)
    return LLaVADataset(**args)


def supervised_text(tokenizer, sample):
    """The supervised tokens, decoded, one string per contiguous run."""
    labels = sample['labels'].tolist()
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_chat_labels_cover_answers_and_end_of_turn_only(data, tokenizer):
    ds = dataset(data, 'chat')
    with_image, text_only = ds[0], ds[1]
    assert supervised_text(tokenizer, with_image) == [
        'The shape is red.<|im_end|>', 'There is one shape.<|im_end|>']
    assert supervised_text(tokenizer, text_only) == ['2 plus 3 is 5.<|im_end|>']
    image_id = tokenizer.convert_tokens_to_ids('<image>')
    ids = with_image['input_ids']
    assert (ids == image_id).sum() == N_IMAGE
    positions = (ids == image_id).nonzero().squeeze(-1)
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + N_IMAGE))
    assert (with_image['labels'][ids == image_id] == IGNORE_INDEX).all()
    assert with_image['pixel_values'].shape == (3, 32, 32)
    assert text_only['pixel_values'] is None and (text_only['input_ids'] != image_id).all()
    rendered = tokenizer.decode(ids[ids != image_id])
    assert rendered.startswith('<|im_start|>user\n\nWhat colour')


def test_plain_and_caption_text_templates(data, tokenizer):
    plain = dataset(data, 'plain')[0]
    image_id = tokenizer.convert_tokens_to_ids('<image>')
    assert (plain['input_ids'][:N_IMAGE] == image_id).all()
    assert supervised_text(tokenizer, plain) == ['The shape is red.<|im_end|>']
    caption_ids = tokenizer('The shape is red.', add_special_tokens=False).input_ids
    assert plain['input_ids'][N_IMAGE:].tolist() == caption_ids + [tokenizer.eos_token_id]

    caption = dataset(data, 'caption_text')[0]
    assert caption['pixel_values'] is None
    assert (caption['input_ids'] != image_id).all()
    assert torch.equal(caption['input_ids'], caption['labels'])
    assert tokenizer.decode(caption['input_ids']) == 'The shape is red.<|im_end|>'


def test_truncation_keeps_image_tokens_whole(data, tokenizer):
    full = dataset(data, 'chat')[0]
    limit = len(full['input_ids']) - 5
    sample = dataset(data, 'chat', max_length=limit)[0]
    assert torch.equal(sample['input_ids'], full['input_ids'][:limit])
    assert torch.equal(sample['labels'], full['labels'][:limit])
    image_id = tokenizer.convert_tokens_to_ids('<image>')
    assert (sample['input_ids'] == image_id).sum() == N_IMAGE

    with pytest.raises(BadSampleError, match=r'too_long: .*beyond max_length=8'):
        dataset(data, 'chat', max_length=8).prepare_data(0)


GOOD = {'id': 'good', 'image': 'red.png', 'conversations': [
    {'from': 'human', 'value': '<image>\nWhat colour is it?'}, {'from': 'gpt', 'value': 'red'}]}


def turns(*pairs):
    return [{'from': role, 'value': value} for role, value in pairs]


@pytest.mark.parametrize('row, reason', [
    ({'id': 'x', 'image': 'missing.png',
      'conversations': turns(('human', '<image>\nhi'), ('gpt', 'red'))}, 'missing_image'),
    ({'id': 'x', 'image': 'empty.png',
      'conversations': turns(('human', '<image>\nhi'), ('gpt', 'red'))}, 'zero_size_image'),
    ({'id': 'x', 'image': 'truncated.png',
      'conversations': turns(('human', '<image>\nhi'), ('gpt', 'red'))}, 'unreadable_image'),
    ({'id': 'x', 'conversations': turns(('human', '<image>\nhi'), ('gpt', 'red'))},
     'image_tag_mismatch'),
    ({'id': 'x', 'image': 'red.png', 'conversations': turns(('human', 'hi'), ('gpt', 'red'))},
     'image_tag_mismatch'),
    ({'id': 'x', 'conversations': turns(('robot', 'hi'), ('gpt', 'red'))}, 'unknown_role'),
    ({'id': 'x', 'conversations': []}, 'no_conversations'),
    ({'id': 'x', 'conversations': turns(('human', 'hi'), ('gpt', '  '))}, 'empty_text'),
])
def test_bad_rows_are_skipped_and_reported(data, row, reason):
    folder, _ = data
    (folder / 'empty.png').write_bytes(b'')
    png = (folder / 'red.png').read_bytes()
    (folder / 'truncated.png').write_bytes(png[:len(png) // 2])
    path = folder / 'bad.json'
    path.write_text(json.dumps([GOOD, row]))
    ds = dataset((folder, str(path)), 'chat')
    with pytest.raises(BadSampleError) as err:
        ds.prepare_data(1)
    assert err.value.reason == reason

    # Training never sees the bad row: it gets the next good one, and the
    # skipped row is reported with its file, row, id and reason.
    sample = ds[1]
    assert torch.equal(sample['input_ids'], ds[0]['input_ids'])
    [record] = sample['skipped']
    assert record['file'] == str(path) and record['row'] == 1 and record['id'] == 'x'
    assert record['reason'] == reason
    assert 'skipped' not in ds[0]
    batch = dpa_collate([ds[0], sample])
    assert batch['skipped'] == [record]


def test_invalid_jsonl_lines_are_reported_not_fatal(data):
    folder, path = data
    with open(path, 'a') as f:
        f.write('\n{"id": "broken", "conversations": [\n')
    ds = dataset(data, 'chat')
    assert len(ds) == 2
    [problem] = ds.load_problems
    assert problem['reason'] == 'invalid_json' and problem['row'] == 2


def test_pad_to_square_centres_with_mean_colour():
    image = Image.new('RGB', (40, 20), (255, 0, 0))
    square = expand_to_square(image, (0.5, 0.25, 0.0))
    assert square.size == (40, 40)
    assert square.getpixel((20, 0)) == (127, 63, 0)
    assert square.getpixel((20, 20)) == (255, 0, 0)


def test_collate_right_pads(data):
    ds = dataset(data, 'chat')
    batch = dpa_collate([ds[0], ds[1]])
    lengths = [len(ds[0]['input_ids']), len(ds[1]['input_ids'])]
    assert batch['input_ids'].shape == (2, max(lengths))
    assert batch['attention_mask'].sum(-1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch['labels'][short, min(lengths):] == IGNORE_INDEX).all()
    assert batch['pixel_values'].shape == (1, 3, 32, 32)
    assert dpa_collate([ds[1]])['pixel_values'] is None
