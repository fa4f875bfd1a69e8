"""Dataset mixtures: rows drawn per source at its ratio, the epoch length,
determinism for a seed, per-source counts in the log, and each source's own
image folder."""
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import dpa  # noqa: F401
from dpa.datasets import mixture
from dpa.datasets.mixture import LLaVAMixture, data_sources, sample_rows
from dpa.registry import DATASETS

TOKENIZER = dict(type='TinyTokenizer')
PROCESSOR = dict(type='HFImageProcessor',
                 config=dict(image_processor_type='CLIPImageProcessor',
                             size=dict(shortest_edge=32), crop_size=dict(height=32, width=32)))
COLOURS = {'red': (255, 0, 0), 'blue': (0, 0, 255)}


def test_ratio_one_takes_every_row_once_in_order():
    assert sample_rows(7, 1.0, seed=0, name='a').tolist() == list(range(7))


@pytest.mark.parametrize('ratio', [0.25, 0.5, 0.9])
def test_ratio_below_one_draws_a_subset(ratio):
    rows = sample_rows(40, ratio, seed=0, name='a')
    assert len(rows) == round(ratio * 40)
    assert len(set(rows.tolist())) == len(rows)  # without replacement
    assert rows.tolist() == sorted(rows.tolist())


def test_ratio_above_one_repeats_then_draws_the_rest():
    rows = sample_rows(10, 2.5, seed=0, name='a')
    counts = Counter(rows.tolist())
    assert len(rows) == 25
    assert sorted(counts.values()) == [2] * 5 + [3] * 5


def test_draws_depend_on_seed_and_source_only():
    a = sample_rows(100, 0.3, seed=0, name='captions')
    assert np.array_equal(a, sample_rows(100, 0.3, seed=0, name='captions'))
    assert not np.array_equal(a, sample_rows(100, 0.3, seed=1, name='captions'))
    assert not np.array_equal(a, sample_rows(100, 0.3, seed=0, name='other'))


def test_ratio_zero_and_negative():
    assert len(sample_rows(10, 0.0, seed=0, name='a')) == 0
    with pytest.raises(ValueError, match="source 'a': ratio must be >= 0"):
        sample_rows(10, -0.5, seed=0, name='a')


def test_data_sources_of_a_plain_config_and_a_mixture():
    plain = dict(data_files=['x.json'], image_folder='img')
    assert data_sources(plain) == {'data': plain}
    mix = dict(type='LLaVAMixture', sources=dict(a=dict(data_files=['a.json'])))
    assert data_sources(mix) == {'a': dict(data_files=['a.json'])}


@pytest.fixture
def two_sources(tmp_path):
    """Two caption sources in their own image folders: 8 red and 4 blue
    pictures, each caption naming its colour and row."""
    sources = {}
    for colour, count in (('red', 8), ('blue', 4)):
        folder = tmp_path / colour
        folder.mkdir()
        rows = []
        for i in range(count):
            Image.new('RGB', (16, 16), COLOURS[colour]).save(folder / f'{i}.png')
            rows.append({'id': f'{colour}{i}', 'image': f'{i}.png', 'conversations': [
                {'from': 'human', 'value': '<image>\nDescribe the image briefly.'},
                {'from': 'gpt', 'value': f'a {colour} square {i}.'}]})
        path = tmp_path / f'{colour}.json'
        path.write_text(json.dumps(rows))
        sources[colour] = dict(data_files=[str(path)], image_folder=str(folder))
    return sources


def build_mixture(sources, seed=0, template='plain'):
    return LLaVAMixture(sources=sources, seed=seed, tokenizer=TOKENIZER, template=template,
                        image_processor=PROCESSOR, num_image_tokens=16, max_length=64)


def caption_of(dataset, sample):
    labelled = [t for t in sample['labels'].tolist() if t >= 0]
    return dataset.datasets[0].tokenizer.decode(labelled)


def test_epoch_holds_each_source_at_its_ratio(two_sources, monkeypatch):
    logged = []
    monkeypatch.setattr(mixture, 'print_log', lambda msg, **kwargs: logged.append(msg))
    two_sources['red']['ratio'] = 0.5
    two_sources['blue']['ratio'] = 2.0
    mix = build_mixture(two_sources)
    assert len(mix) == 4 + 8
    assert mix.counts == {'red': 4, 'blue': 8}
    assert mix.metainfo == {'samples_per_source': {'red': 4, 'blue': 8}}  # kept in checkpoints
    assert logged == ['[LLaVAMixture] epoch of 12 samples: red: 8 rows x ratio 0.5 = 4 '
                      'samples; blue: 4 rows x ratio 2 = 8 samples']
    captions = [caption_of(mix, mix[i]) for i in range(len(mix))]
    red = [c for c in captions if c.startswith('a red')]
    blue = [c for c in captions if c.startswith('a blue')]
    assert len(red) == 4 and len(set(red)) == 4
    assert Counter(blue) == {f'a blue square {i}.<|im_end|>': 2 for i in range(4)}
    # Each row's image comes from its own source's folder.
    for i in range(len(mix)):
        pixels = mix[i]['pixel_values']
        red_channel_high = bool(pixels[0].mean() > pixels[2].mean())
        assert red_channel_high == captions[i].startswith('a red')


def test_mixture_is_deterministic_for_a_seed(two_sources):
    two_sources['red']['ratio'] = 0.5
    first = build_mixture(two_sources, seed=3)
    again = build_mixture(two_sources, seed=3)
    other = build_mixture(two_sources, seed=4)
    assert np.array_equal(first.index, again.index)
    assert not np.array_equal(first.index, other.index)


def test_mixture_is_built_from_a_data_config(two_sources):
    config = dict(type='LLaVAMixture', sources=two_sources, seed=0, tokenizer=TOKENIZER,
                  template='caption_text', max_length=64)
    mix = DATASETS.build(config)
    assert len(mix) == 12 and mix[0]['pixel_values'] is None
    assert mix.load_problems == []
    info = mix.get_data_info(8)
    assert info['row']['id'] == 'blue0'


def test_source_with_unknown_key_is_refused(two_sources):
    two_sources['red']['weight'] = 2
    with pytest.raises(ValueError, match=r"source 'red': unknown keys \['weight'\]"):
        build_mixture(two_sources)
