import json
import os
import os.path as osp
import re

import pytest
from transformers import AutoTokenizer

from dpa.datasets.synthetic import make_synthetic_data
from dpa.synthetic_text import COLOURS, POSITIONS, SHAPES, VOCABULARY
from dpa.models.tiny_tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer

NUM_CAPTIONS, NUM_INSTRUCTIONS = 64, 48  # the defaults


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_synthetic_data(tmp_path_factory.mktemp('syn') / 'data')


@pytest.fixture(scope='module')
def tokenizer():
    return build_tiny_tokenizer()


def _rows(paths):
    with open(paths['captions']) as f:
        captions = json.load(f)
    with open(paths['instructions']) as f:
        instructions = [json.loads(line) for line in f]
    return captions, instructions


def _texts(paths):
    captions, instructions = _rows(paths)
    return [turn['value'] for row in captions + instructions for turn in row['conversations']]


def test_layout_and_counts(data):
    captions, instructions = _rows(data)
    assert len(captions) == NUM_CAPTIONS and len(instructions) == NUM_INSTRUCTIONS
    assert captions[0]['id'] == 'cap_000000' and instructions[0]['id'] == 'ins_000000'
    for row in captions:
        human, gpt = row['conversations']
        assert human == {'from': 'human', 'value': '<image>\nDescribe the image briefly.'}
        assert gpt['from'] == 'gpt' and gpt['value'].endswith('.')
        assert os.path.isfile(os.path.join(data['image_folder'], row['image']))
    text_only = [row for row in instructions if 'image' not in row]
    assert len(text_only) == round(0.3 * NUM_INSTRUCTIONS)
    for row in instructions:
        turns = row['conversations']
        assert len(turns) in (2, 4, 6)
        assert [t['from'] for t in turns] == ['human', 'gpt'] * (len(turns) // 2)
        has_tag = turns[0]['value'].startswith('<image>\n')
        assert has_tag == ('image' in row)
        assert sum('<image>' in t['value'] for t in turns) == int(has_tag)
        if has_tag:
            assert os.path.isfile(os.path.join(data['image_folder'], row['image']))


def test_deterministic(tmp_path):
    a = make_synthetic_data(tmp_path / 'a', 8, 8, image_size=32, seed=3)
    b = make_synthetic_data(tmp_path / 'b', 8, 8, image_size=32, seed=3)
    for key in ('captions', 'instructions'):
        with open(a[key], 'rb') as fa, open(b[key], 'rb') as fb:
            assert fa.read() == fb.read()
    names = sorted(os.listdir(a['image_folder']))
    assert names == sorted(os.listdir(b['image_folder']))
    for name in names[:3] + names[-3:]:
        with open(os.path.join(a['image_folder'], name), 'rb') as fa:
            with open(os.path.join(b['image_folder'], name), 'rb') as fb:
                assert fa.read() == fb.read()
    c = make_synthetic_data(tmp_path / 'c', 8, 8, image_size=32, seed=4)
    with open(a['captions']) as fa, open(c['captions']) as fc:
        assert fa.read() != fc.read()


def test_idempotent_and_atomic(tmp_path):
    root = tmp_path / 'data'
    first = make_synthetic_data(root, 4, 4, image_size=16)
    mtime = os.stat(first['captions']).st_mtime_ns
    assert make_synthetic_data(root, 4, 4, image_size=16) == first
    assert os.stat(first['captions']).st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == ['data']  # no temporary dir left behind
    # Other parameters get a folder of their own: the first set stays as it was.
    other = make_synthetic_data(root, 6, 4, image_size=16)
    assert osp.dirname(other['captions']) == str(root / 'c6_i4_e48_16px_seed0_plain_v2')
    with open(other['captions']) as f:
        assert len(json.load(f)) == 6
    with open(first['captions']) as f:
        assert len(json.load(f)) == 4
    assert os.stat(first['captions']).st_mtime_ns == mtime
    assert make_synthetic_data(root, 6, 4, image_size=16) == other
    assert [n for n in os.listdir(root) if '.tmp-' in n] == []


def test_synthetic_text_is_in_vocabulary(data, tokenizer):
    unk = tokenizer.unk_token_id
    for text in _texts(data):
        ids = tokenizer(text)['input_ids']
        assert unk not in ids
        assert tokenizer.decode(ids) == text
        # Every word is one vocabulary token, never spelled out char by char.
        expected = re.findall(r'<image>|[A-Za-z]+|[^A-Za-z]', text)
        assert tokenizer.convert_ids_to_tokens(ids) == expected
        assert set(expected) - {'<image>'} <= set(VOCABULARY)


def test_unknown_ascii_falls_back_to_characters(tokenizer):
    text = 'Hello, world! {x: 42}\tdone~'
    ids = tokenizer(text)['input_ids']
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer):
    assert len(tokenizer) < TINY_VOCAB_SIZE
    assert tokenizer.pad_token_id == 0 and tokenizer.pad_token == '<|endoftext|>'
    assert tokenizer.eos_token == '<|im_end|>' and tokenizer.bos_token is None
    text = '<|im_start|>user\n<image>\nhi<|im_end|>'
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)['input_ids'])
    assert tokens == ['<|im_start|>', 'user', '\n', '<image>', '\n', 'h', 'i', '<|im_end|>']


def test_chat_template(tokenizer):
    messages = [
        {'role': 'user', 'content': '<image>\nWhat colour is the shape?'},
        {'role': 'assistant', 'content': 'The shape is red.'},
    ]
    expected = (
        '<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n'
        '<|im_start|>assistant\nThe shape is red.<|im_end|>\n'
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == expected.split('<|im_start|>assistant')[0] + '<|im_start|>assistant\n'
    with_system = [{'role': 'system', 'content': 'Be brief.'}] + messages
    assert tokenizer.apply_chat_template(with_system, tokenize=False).startswith(
        '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n')


def test_save_load_round_trip(tokenizer, data, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tokenizer.chat_template
    assert len(loaded) == len(tokenizer)
    assert loaded.convert_tokens_to_ids('<image>') == tokenizer.convert_tokens_to_ids('<image>')
    assert ((loaded.pad_token_id, loaded.eos_token_id)
            == (tokenizer.pad_token_id, tokenizer.eos_token_id))
    for text in _texts(data)[:50] + ['<|im_start|>user\n<image>\nhi<|im_end|>']:
        assert loaded(text)['input_ids'] == tokenizer(text)['input_ids']


def test_terse_caption_style_changes_only_the_captions_wording(tmp_path):
    plain = make_synthetic_data(tmp_path / 'plain', 6, 6, image_size=16, num_eval=4)
    terse = make_synthetic_data(tmp_path / 'terse', 6, 6, image_size=16, num_eval=4,
                                caption_style='terse')
    for key in ('instructions', 'eval'):  # the other rows stay as they were
        with open(plain[key]) as fp, open(terse[key]) as ft:
            assert fp.read() == ft.read()
    with open(plain['captions']) as fp, open(terse['captions']) as ft:
        plain_rows, terse_rows = json.load(fp), json.load(ft)
    tokenizer = build_tiny_tokenizer()
    for p, t in zip(plain_rows, terse_rows):
        assert p['image'] == t['image']
        caption = t['conversations'][1]['value']
        # "top: circle, red." per shape: the content words of the scene, no template words.
        assert re.fullmatch(r'((\w+): (\w+), (\w+)\.( |$))+', caption), caption
        words = set(re.findall(r'\w+', caption))
        assert words <= set(POSITIONS) | set(SHAPES) | set(COLOURS)
        assert not {'a', 'the', 'on', 'of'} & words
        assert tokenizer.unk_token_id not in tokenizer(caption)['input_ids']
    with pytest.raises(ValueError, match="caption_style='fancy'"):
        make_synthetic_data(tmp_path / 'bad', 2, 2, caption_style='fancy')


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_always_ask_changes_only_the_instruction_turns(tmp_path):
    drawn = make_synthetic_data(tmp_path, 4, 40, image_size=16, num_eval=6)
    asked = make_synthetic_data(tmp_path, 4, 40, image_size=16, num_eval=6,
                                always_ask=['position', 'colour'])
    # Another set in the same root: a folder of its own, named by the setting.
    assert asked['instructions'] == str(
        tmp_path / 'c4_i40_e6_16px_seed0_plain_ask-position_ask-colour_v2' / 'instructions.jsonl')
    for key in ('captions', 'eval'):  # the pictures and the held-out split stay
        with open(drawn[key]) as fd, open(asked[key]) as fa:
            assert fd.read() == fa.read()
    for name in os.listdir(drawn['image_folder']):
        with open(os.path.join(drawn['image_folder'], name), 'rb') as fd, \
                open(os.path.join(asked['image_folder'], name), 'rb') as fa:
            assert fd.read() == fa.read(), name
    drawn_rows, asked_rows = _jsonl(drawn['instructions']), _jsonl(asked['instructions'])
    image_rows = 0
    for d, a in zip(drawn_rows, asked_rows, strict=True):
        assert (d['id'], d.get('image')) == (a['id'], a.get('image'))
        questions = [t['value'].replace('<image>\n', '') for t in a['conversations'][::2]]
        if 'image' not in a:
            assert a == d  # text-only rows as they were
            continue
        image_rows += 1
        assert a['conversations'][0]['value'].startswith('<image>\n')
        assert sum(q.startswith('Where is the') for q in questions) >= 1
        assert sum(q.startswith('What colour is the') and 'background' not in q
                   for q in questions) >= 1
        assert 1 <= len(questions) <= 3 and len(set(questions)) == len(questions)
    assert image_rows >= 20
    with pytest.raises(ValueError, match=r"always_ask=\['where'\].*'position'"):
        make_synthetic_data(tmp_path / 'bad', 2, 2, always_ask=['where'])


def test_a_config_asking_an_unknown_question_type_fails_before_any_model_loads():
    from dpa.errors import ConfigError
    from dpa.engine.preflight import check_synthetic_data
    check_synthetic_data(dict(root='r', always_ask=['shape', 'position']))
    with pytest.raises(ConfigError, match=r"synthetic_data.always_ask=\['where'\]"):
        check_synthetic_data(dict(root='r', always_ask=['where']))
    with pytest.raises(ConfigError, match=r"synthetic_data.always_ask=3: give a list"):
        check_synthetic_data(dict(root='r', always_ask=3))
