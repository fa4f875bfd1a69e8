"""Rows of any JSON shape are reported, never raised; images of any mode and
size open as 8-bit RGB; BOM-prefixed files load."""
import json
import os.path as osp
import random
import sys
import time

import numpy as np
import pytest
from PIL import Image

import dpa  # noqa: F401
from dpa.datasets.llava import (BadSampleError, LLaVADataset, open_image, read_rows, to_rgb,
                                validate_row)
from dpa.datasets.validation import check_dataset, check_files
from tiny import REPO

TOKENIZER = dict(type='TinyTokenizer')
PROCESSOR = dict(type='HFImageProcessor',
                 config=dict(image_processor_type='CLIPImageProcessor',
                             size=dict(shortest_edge=32), crop_size=dict(height=32, width=32)))
QA = [{'from': 'human', 'value': '<image>\nWhat colour?'}, {'from': 'gpt', 'value': 'red'}]


def dataset(path, folder, template='chat', **kwargs):
    return LLaVADataset(data_files=[str(path)], image_folder=str(folder), tokenizer=TOKENIZER,
                        template=template, image_processor=PROCESSOR, num_image_tokens=16,
                        max_length=4096, **kwargs)


# ---------------------------------------------------------------- schema

def random_value(rng, depth=0):
    """A random JSON value of any type, sometimes one a LLaVA row uses."""
    kinds = ['null', 'bool', 'int', 'float', 'str', 'tag', 'surrogate', 'path', 'list', 'dict']
    kind = rng.choice(kinds if depth < 2 else kinds[:8])
    if kind == 'null':
        return None
    if kind == 'bool':
        return rng.random() < 0.5
    if kind == 'int':
        return rng.randint(-5, 5)
    if kind == 'float':
        return rng.choice([0.5, -1e300, float('nan')])
    if kind == 'str':
        return rng.choice(['', ' ', 'human', 'gpt', 'red', 'x' * 3])
    if kind == 'tag':
        return rng.choice(['<image>', '<image>\nWhat?', '<image><image>'])
    if kind == 'surrogate':
        return '\ud800 broken'
    if kind == 'path':
        return rng.choice(['ok.png', 'missing.png', 'cut.png', '', '/', 'ok.png\x00'])
    if kind == 'list':
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(['from', 'value', 'id', 'image', 'conversations']):
            random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def random_row(rng):
    """A row with one to three fields (or turns) replaced by random values."""
    if rng.random() < 0.1:
        return random_value(rng)
    row = {'id': f'r{rng.randint(0, 10**6)}', 'image': 'ok.png',
           'conversations': [dict(turn) for turn in QA]}
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(['id', 'image', 'drop_image', 'conversations', 'turn', 'from',
                            'value', 'answer_tag', 'system_tag', 'extra_turn'])
        turns = row.get('conversations')
        has_turns = isinstance(turns, list) and turns and isinstance(turns[-1], dict)
        if where in ('id', 'image', 'conversations'):
            row[where] = random_value(rng)
        elif where == 'drop_image':
            row.pop('image', None)
        elif where == 'answer_tag' and has_turns:
            turns[-1]['value'] = '<image> ' + str(turns[-1].get('value'))
        elif where == 'system_tag' and isinstance(turns, list):
            turns.insert(0, {'from': 'system', 'value': 'See <image>.'})
        elif where == 'extra_turn' and isinstance(turns, list):
            turns.append(random_value(rng))
        elif where == 'turn' and isinstance(turns, list) and turns:
            turns[rng.randrange(len(turns))] = random_value(rng)
        elif where in ('from', 'value') and has_turns:
            turns[-1] = dict(turns[-1], **{where: random_value(rng)})
    return row


@pytest.fixture
def image_folder(tmp_path):
    Image.new('RGB', (20, 10), (255, 0, 0)).save(tmp_path / 'ok.png')
    png = (tmp_path / 'ok.png').read_bytes()
    (tmp_path / 'cut.png').write_bytes(png[:len(png) // 2])
    return tmp_path


def test_rows_of_random_shapes_are_reported_by_both_paths_never_raised(image_folder):
    rng = random.Random(0)
    rows = [{'id': 'good', 'image': 'ok.png', 'conversations': QA}]
    rows += [random_row(rng) for _ in range(300)]
    path = image_folder / 'rows.jsonl'
    path.write_text(''.join(json.dumps(row) + '\n' for row in rows))

    # check_data's file mode.
    file_problems = check_files([str(path)], str(image_folder))
    # check_data's config mode and training: the chat template checks the same rules.
    chat = dataset(path, image_folder)
    config_problems = check_dataset(chat)
    bad_in_file_mode = {p['row'] for p in file_problems if p['reason'] != 'duplicate_id'}
    bad_in_training = {p['row'] for p in config_problems if p['reason'] != 'duplicate_id'}
    assert bad_in_file_mode == bad_in_training
    assert len(bad_in_file_mode) > 200  # the generator does make bad rows
    for record in file_problems + config_problems:
        assert record['reason'] and record['detail'] and record['file'] == str(path)
        json.dumps(record)  # reportable as a JSON line

    # Every row either tokenises or is a reported bad row, in every template.
    for template in ('chat', 'plain', 'caption_text'):
        ds = chat if template == 'chat' else dataset(path, image_folder, template)
        for index in range(len(ds)):
            row = ds.get_data_info(index)['row_index']
            try:
                ds.prepare_data(index)
            except BadSampleError as err:
                assert err.reason and err.detail
                if template == 'chat':  # a good row with an earlier row's id is skipped too
                    assert row in bad_in_training or err.reason == 'duplicate_id'
            else:
                if template == 'chat':
                    assert row not in bad_in_training
            assert ds[index]['input_ids'].numel() > 0  # a bad row is replaced, not raised


@pytest.mark.parametrize('row, reason', [
    ({'image': None, 'conversations': QA}, 'bad_image_field'),
    ({'image': 7, 'conversations': QA}, 'bad_image_field'),
    ({'image': ['ok.png'], 'conversations': QA}, 'bad_image_field'),
    ({'conversations': [QA[0], {'from': 'gpt', 'value': 'It is <image>.'}]},
     'image_tag_misplaced'),
    ({'id': ['x'], 'conversations': QA[1:]}, 'bad_id'),
    ('just a string', 'not_an_object'),
    ({'conversations': ['human', 'gpt']}, 'bad_turn'),
    ({'conversations': [{'from': 'human', 'value': ['hi']}, QA[1]]}, 'bad_turn'),
    ({'conversations': {'from': 'gpt', 'value': 'red'}}, 'no_conversations'),
    ({'conversations': [{'from': 'gpt', 'value': 'bad \ud800'}]}, 'bad_text'),
])
def test_schema_reasons(row, reason):
    with pytest.raises(BadSampleError) as err:
        validate_row(row)
    assert err.value.reason == reason


def test_image_tag_only_in_an_answer_is_reported_in_file_mode_and_every_stage(image_folder):
    # Training died in stage 1 with "the batch holds <image> tokens but no pixel_values".
    row = {'id': 'x', 'conversations': [{'from': 'human', 'value': 'Describe it.'},
                                        {'from': 'gpt', 'value': '<image> A red square.'}]}
    path = image_folder / 'rows.json'
    path.write_text(json.dumps([row, {'id': 'ok', 'image': 'ok.png', 'conversations': QA}]))
    [problem] = check_files([str(path)], str(image_folder))
    assert problem['reason'] == 'image_tag_misplaced' and problem['id'] == 'x'
    for template in ('caption_text', 'plain', 'chat'):
        [problem] = check_dataset(dataset(path, image_folder, template))
        assert problem['reason'] == 'image_tag_misplaced', template


def test_a_json_file_that_is_not_a_list_is_reported_by_check_data(tmp_path):
    path = tmp_path / 'rows.json'
    path.write_text('{"id": 1}')
    [problem] = check_files([str(path)], str(tmp_path))
    assert problem['reason'] == 'unreadable_file' and 'list of rows' in problem['detail']


def test_bom_prefixed_files_load_every_row(tmp_path):
    rows = [{'id': 'a', 'conversations': QA[1:]}, {'id': 'b', 'conversations': QA[1:]}]
    (tmp_path / 'rows.json').write_bytes(b'\xef\xbb\xbf' + json.dumps(rows).encode())
    (tmp_path / 'rows.jsonl').write_bytes(
        b'\xef\xbb\xbf' + b''.join(json.dumps(r).encode() + b'\n' for r in rows))
    for name in ('rows.json', 'rows.jsonl'):
        problems = []
        assert [row for _, row in read_rows(str(tmp_path / name), problems)] == rows
        assert problems == []
        assert check_files([str(tmp_path / name)], str(tmp_path)) == []


def test_a_line_of_other_bytes_is_one_bad_row(tmp_path):
    path = tmp_path / 'rows.jsonl'
    path.write_bytes(json.dumps({'conversations': QA[1:]}).encode() + b'\n\xff\xfe{}\n'
                     + json.dumps({'conversations': QA[1:]}).encode() + b'\n')
    problems = []
    assert [index for index, _ in read_rows(str(path), problems)] == [0, 2]
    assert [(p['row'], p['reason']) for p in problems] == [(1, 'invalid_json')]


def test_check_data_reports_image_null_without_a_traceback(tmp_path, capsys):
    sys.path.insert(0, osp.join(REPO, 'tools'))
    import check_data
    path = tmp_path / 'rows.jsonl'
    path.write_text(json.dumps({'id': 'n', 'image': None, 'conversations': QA}) + '\n')
    report = tmp_path / 'report.jsonl'
    with pytest.raises(SystemExit) as exit_code:
        check_data.main([str(path), '--image-folder', str(tmp_path), '--report', str(report)])
    assert exit_code.value.code == 1
    assert 'bad_image_field' in capsys.readouterr().out
    [record] = map(json.loads, report.open())
    assert record['reason'] == 'bad_image_field' and 'NoneType' in record['detail']


# ---------------------------------------------------------------- images

def test_sixteen_bit_grey_png_keeps_its_values(tmp_path):
    # convert('RGB') clipped every value over 255: an all-white image.
    values = np.array([[0, 257, 32896], [65535, 1000, 60000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / 'grey16.png')
    assert Image.open(tmp_path / 'grey16.png').mode in ('I;16', 'I')
    rgb = np.asarray(open_image(str(tmp_path / 'grey16.png')))
    expected = np.rint(values / 257).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], expected)
    # 32-bit integer grey holding 16-bit data, as older PIL opened such PNGs.
    as_int32 = Image.fromarray(values.astype(np.int32), 'I')
    assert np.array_equal(np.asarray(to_rgb(as_int32))[..., 0], expected)


def test_unusual_modes_become_the_colours_they_show(tmp_path):
    palette = Image.new('P', (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info['transparency'] = 0
    palette.save(tmp_path / 'p.png', transparency=0)
    Image.new('LA', (2, 1), (200, 10)).save(tmp_path / 'la.png')
    Image.new('CMYK', (2, 1), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg', quality=100)
    Image.new('1', (2, 1), 1).save(tmp_path / 'bw.png')
    Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32), 'F').save(tmp_path / 'f.tiff')
    got = {name: np.asarray(open_image(str(tmp_path / name))).tolist()
           for name in ('p.png', 'la.png', 'bw.png', 'f.tiff')}
    assert got['p.png'] == [[[255, 0, 0], [0, 0, 255]]]
    assert got['la.png'] == [[[200, 200, 200]] * 2]
    assert got['bw.png'] == [[[255, 255, 255]] * 2]
    assert got['f.tiff'] == [[[0, 0, 0], [128, 128, 128]]]
    cmyk = np.asarray(open_image(str(tmp_path / 'cmyk.jpg')))
    assert cmyk.dtype == np.uint8 and (cmyk[..., 0] > 240).all() and (cmyk[..., 1:] < 15).all()


def test_decompression_bomb_is_a_too_large_image_row(tmp_path, monkeypatch):
    Image.new('RGB', (100, 100)).save(tmp_path / 'big.png')
    rows = tmp_path / 'rows.jsonl'
    rows.write_text(json.dumps({'id': 'big', 'image': 'big.png', 'conversations': QA}) + '\n')
    for limit in (9999, 4000):  # PIL warns past the limit and raises past twice it
        monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', limit)
        with pytest.raises(BadSampleError) as err:
            open_image(str(tmp_path / 'big.png'))
        assert err.value.reason == 'too_large_image' and 'MAX_IMAGE_PIXELS' in err.value.detail
        [problem] = check_files([str(rows)], str(tmp_path))
        assert problem['reason'] == 'too_large_image'
        [problem] = check_dataset(dataset(rows, tmp_path))
        assert problem['reason'] == 'too_large_image'


def test_pixel_cap_downscales_before_padding(tmp_path):
    Image.new('RGB', (10000, 50), (0, 255, 0)).save(tmp_path / 'strip.png')
    rows = tmp_path / 'rows.jsonl'
    rows.write_text(json.dumps({'image': 'strip.png', 'conversations': QA}) + '\n')
    capped = dataset(rows, tmp_path, pad_to_square=True, max_image_pixels=1024 ** 2)
    start = time.perf_counter()
    sample = capped.prepare_data(0)
    took = time.perf_counter() - start
    assert sample['pixel_values'].shape == (3, 32, 32)
    assert took < 1.0, took  # uncapped, the padded square is 10^8 pixels (seconds, > 1 GB)
    image = open_image(str(tmp_path / 'strip.png'), max_pixels=1024 ** 2, square=True)
    assert image.size == (1024, 5)
    # Under the cap, an image is untouched; without padding the cap counts its own pixels.
    assert open_image(str(tmp_path / 'strip.png'), max_pixels=10 ** 6).size == (10000, 50)
    assert open_image(str(tmp_path / 'strip.png'), max_pixels=None, square=True).size == (
        10000, 50)
