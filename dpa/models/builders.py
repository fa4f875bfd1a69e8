"""Builders of the Hugging Face parts, registered under names so configs stay
plain data: ``dict(type='HFCausalLM', pretrained='/ckpt/llm')`` loads a local
checkpoint, ``dict(type='HFCausalLM', config=dict(model_type='qwen2', ...))``
builds a random stand-in with the same architecture (seeded, so every stage
and process builds the same weights)."""
import contextlib
import json
import os.path as osp
from typing import Optional, Sequence, Union

import torch
import transformers
from mmengine.registry import Registry
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                          AutoTokenizer, TokenizersBackend)

from dpa.errors import ConfigError
from dpa.models.attention import resolve_attn_implementation
from dpa.models.checkpoint_code import checkpoint_code_class
from dpa.models.gguf import gguf_checkpoint, gguf_config, gguf_path
from dpa.models.onnx_vision import is_onnx_file, onnx_checkpoint
from dpa.models.internlm2 import (InternLM2Tokenizer, check_sentencepiece_ids,
                                  is_internlm2_tokenizer_dir, legacy_internlm2_config)
from dpa.models.standin_checkpoint import reload_as_checkpoint
from dpa.registry import MODELS

# Tokenizers and image processors are not nn.Modules: they get their own registry.
PROCESSORS = Registry('processor', locations=['dpa.models'])
IMAGE_TOKEN = '<image>'


def _dtype(name):
    return getattr(torch, name) if isinstance(name, str) else name


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def hf_config(pretrained: Optional[str] = None, config: Optional[dict] = None,
              trust_remote_code: bool = False, gguf_file: Optional[str] = None):
    """The transformers config of a component, read without loading weights."""
    if (pretrained is None and gguf_file is None) == (config is None):
        raise ValueError('give exactly one of `pretrained` (a local checkpoint directory or '
                         'GGUF file) or `config` (a dict with `model_type` for a random stand-in)')
    gguf = gguf_path(pretrained, gguf_file)
    if gguf is not None:
        return gguf_config(gguf)
    if is_onnx_file(pretrained):
        pretrained = onnx_checkpoint(pretrained)
    if pretrained is not None:
        return legacy_internlm2_config(pretrained) or AutoConfig.from_pretrained(
            pretrained, trust_remote_code=trust_remote_code)
    config = dict(config)
    # InternLM2 too: `import dpa` registers the project's own implementation.
    return AutoConfig.for_model(config.pop('model_type'), **config)


def llm_config(llm: dict):
    """The transformers config of an ``HFCausalLM`` config dict, read without
    loading weights."""
    return hf_config(llm.get('pretrained'), llm.get('config'),
                     llm.get('trust_remote_code', False), llm.get('gguf_file'))


@MODELS.register_module()
def HFCausalLM(pretrained: Optional[str] = None,
               config: Optional[dict] = None,
               torch_dtype: str = 'float32',
               attn_implementation: Union[str, Sequence[str]] = 'sdpa',
               trust_remote_code: bool = False,
               init_seed: int = 0,
               use_checkpoint_code: bool = False,
               gguf_file: Optional[str] = None):
    """Any ``AutoModelForCausalLM``, from a local checkpoint or a config.

    A GGUF file (``pretrained='/dir/model.gguf'``, or transformers' spelling
    ``pretrained='/dir', gguf_file='model.gguf'``) is dequantized once to a
    float32 checkpoint directory and loaded from there
    (:mod:`dpa.models.gguf`).

    A stand-in built from ``config`` is saved and loaded back with
    ``from_pretrained`` like a user's checkpoint, so what fails on loading a
    real one (uninitialised buffers, tied weights) fails with it too.
    ``trust_remote_code=True`` lets transformers run a checkpoint's own code
    (``auto_map``) for families neither it nor the project implements;
    ``use_checkpoint_code=True`` (with ``trust_remote_code``) runs it even for a
    family the project implements (InternLM2, see docs/families.md).
    ``attn_implementation`` is a kernel or kernels in order of preference, the
    first one this machine runs is taken (:mod:`dpa.models.attention`).
    """
    dtype = _dtype(torch_dtype)
    attn_implementation = resolve_attn_implementation(attn_implementation)

    def load(directory):
        if use_checkpoint_code:
            config_cls = checkpoint_code_class(directory, 'AutoConfig', trust_remote_code)
            model_cls = checkpoint_code_class(directory, 'AutoModelForCausalLM',
                                              trust_remote_code)
            return model_cls.from_pretrained(
                directory, config=config_cls.from_pretrained(directory), dtype=dtype,
                attn_implementation=attn_implementation)
        return AutoModelForCausalLM.from_pretrained(
            directory, config=legacy_internlm2_config(directory), dtype=dtype,
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)

    gguf = gguf_path(pretrained, gguf_file)
    if gguf is not None:
        return load(gguf_checkpoint(gguf))
    if pretrained is not None:
        return load(pretrained)
    cfg = hf_config(config=config, trust_remote_code=trust_remote_code)
    cfg._attn_implementation = attn_implementation
    with _seeded(init_seed):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    return reload_as_checkpoint(model, load)


def _vision_config(cfg):
    # A full CLIP/SigLIP checkpoint holds text and vision towers: keep the vision one.
    return getattr(cfg, 'vision_config', None) or cfg


@MODELS.register_module()
def HFVisionModel(pretrained: Optional[str] = None,
                  config: Optional[dict] = None,
                  torch_dtype: str = 'float32',
                  init_seed: int = 0):
    """The vision tower of a CLIP/SigLIP/DINOv2-like checkpoint (``AutoModel``
    class of its vision config). An ONNX file holding a DINOv2 backbone
    (``pretrained='.../x.onnx'``) is converted once to a checkpoint folder and
    loaded from there (:mod:`dpa.models.onnx_vision`)."""
    if is_onnx_file(pretrained):
        pretrained = onnx_checkpoint(pretrained)
    vision_cfg = _vision_config(hf_config(pretrained, config))
    model_cls = AutoModel._model_mapping[type(vision_cfg)]
    if pretrained is not None:
        return model_cls.from_pretrained(pretrained, config=vision_cfg, dtype=_dtype(torch_dtype))
    with _seeded(init_seed):
        model = model_cls(vision_cfg).to(_dtype(torch_dtype))
    # Through disk like a real checkpoint (see HFCausalLM).
    return reload_as_checkpoint(
        model, lambda directory: model_cls.from_pretrained(directory, dtype=_dtype(torch_dtype)))


# Vision models whose first output token is a CLS token (LLaVA's 'default'
# feature strategy drops it); SigLIP has none.
CLS_MODEL_TYPES = ('clip', 'clip_vision_model', 'dinov2')


def has_cls_token(vision_cfg) -> bool:
    """Whether a vision model of this HF config puts a CLS token first."""
    return vision_cfg.model_type in CLS_MODEL_TYPES


def num_image_tokens(vision_cfg: dict) -> int:
    """How many tokens one image becomes under an ``HFVisionTower`` config,
    read from the HF config alone (no weights loaded): the patches of an
    ``image_size`` picture (the tower's key, else its HF config's)."""
    cfg = _vision_config(hf_config(vision_cfg.get('pretrained'), vision_cfg.get('config')))
    feature_select = vision_cfg.get('feature_select', 'patch')
    image_size = vision_cfg.get('image_size') or cfg.image_size
    patches = (image_size // cfg.patch_size) ** 2
    has_cls = has_cls_token(cfg)
    if feature_select == 'patch':
        return patches
    if feature_select == 'full':
        return patches + int(has_cls)
    raise ValueError(f"vision_tower.feature_select must be 'patch' or 'full', "
                     f"got {feature_select!r}")


# What transformers writes as ``tokenizer_class`` for a tokenizer defined by its
# ``tokenizer.json`` alone (no model-specific class).
GENERIC_TOKENIZER_CLASSES = ('TokenizersBackend', 'PreTrainedTokenizerFast')


@PROCESSORS.register_module()
def HFTokenizer(pretrained: str, trust_remote_code: bool = False,
                use_checkpoint_code: bool = False, gguf_file: Optional[str] = None, **kwargs):
    """A local tokenizer, with the ``<image>`` placeholder token added.

    A GGUF file (as for :func:`HFCausalLM`) gives the tokenizer of its
    converted checkpoint directory, chat template included.

    A tokenizer saved as a generic ``tokenizer.json`` one is loaded as exactly
    that: ``AutoTokenizer`` would pick the class of the ``config.json`` beside
    it (transformers 5 forces e.g. ``Qwen2Tokenizer`` for ``qwen2``), which
    rebuilds the pre-tokenizer and silently changes every id of a custom
    vocabulary. ``use_checkpoint_code=True`` (with ``trust_remote_code``) runs
    the tokenizer class the directory's ``auto_map`` names (see HFCausalLM).
    """
    gguf = gguf_path(pretrained, gguf_file)
    if gguf is not None:
        pretrained = gguf_checkpoint(gguf)
    if use_checkpoint_code:
        tokenizer_cls = checkpoint_code_class(pretrained, 'AutoTokenizer', trust_remote_code)
        tokenizer = tokenizer_cls.from_pretrained(pretrained, **kwargs)
        if is_internlm2_tokenizer_dir(pretrained):
            check_sentencepiece_ids(tokenizer, pretrained)
    elif is_internlm2_tokenizer_dir(pretrained):
        # transformers 5 has no InternLM2 tokenizer; the project's keeps
        # SentencePiece's ids (dpa/models/internlm2/tokenization_internlm2.py).
        tokenizer = InternLM2Tokenizer.from_pretrained(pretrained, **kwargs)
    elif saved_tokenizer_class(pretrained) in GENERIC_TOKENIZER_CLASSES:
        tokenizer = TokenizersBackend.from_pretrained(pretrained, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code,
                                                  **kwargs)
    return with_image_token(tokenizer)


def saved_tokenizer_class(directory: str) -> Optional[str]:
    """The ``tokenizer_class`` a tokenizer directory declares, if any."""
    path = osp.join(directory, 'tokenizer_config.json')
    if not osp.isfile(path) or not osp.isfile(osp.join(directory, 'tokenizer.json')):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f).get('tokenizer_class')


@PROCESSORS.register_module()
def TinyTokenizer(family: Optional[str] = None):
    """The word-level tokenizer of the embedded tiny default; with ``family``,
    the stand-in of that family's tokenizer (its special tokens and chat
    template, see :mod:`dpa.models.chat_templates`). Saved and loaded back
    with :func:`HFTokenizer`, as a checkpoint's tokenizer is."""
    from dpa.models.tiny_tokenizer import build_tiny_tokenizer
    return reload_as_checkpoint(build_tiny_tokenizer(family), HFTokenizer)


def with_image_token(tokenizer):
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        # Padded positions are masked out; any id works, eos is the convention.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@PROCESSORS.register_module()
def HFImageProcessor(pretrained: Optional[str] = None,
                     config: Optional[dict] = None):
    """A local image processor, or one built from ``config`` (which names its
    class in ``image_processor_type``)."""
    if (pretrained is None) == (config is None):
        raise ValueError('image_processor: give exactly one of `pretrained` or `config`')
    if is_onnx_file(pretrained):
        pretrained = onnx_checkpoint(pretrained)
    if pretrained is not None:
        return AutoImageProcessor.from_pretrained(pretrained)
    config = dict(config)
    return getattr(transformers, config.pop('image_processor_type'))(**config)


CHECKPOINT_PARTS = ('llm', 'tokenizer', 'vision_tower', 'image_processor')


def check_checkpoint_paths(cfg) -> None:
    """Every ``pretrained`` of the config's model parts is a local checkpoint
    directory or GGUF file (nothing is downloaded); checked before any model loads.

    Raises:
        ConfigError: naming the part and the path.
    """
    for key in CHECKPOINT_PARTS:
        part = cfg.get(key) or {}
        gguf = gguf_path(part.get('pretrained'), part.get('gguf_file'))
        if gguf is not None:
            if not osp.isfile(gguf):
                raise ConfigError(f'{key}: the GGUF checkpoint {gguf!r} does not exist')
            gguf_config(gguf)  # its header: not GGUF, truncated or unknown fails here, by name
            continue
        path = part.get('pretrained')
        if is_onnx_file(path):
            if not osp.isfile(path):
                raise ConfigError(f'{key}: the ONNX checkpoint {path!r} does not exist')
            continue
        if path is not None and not osp.isdir(path):
            raise ConfigError(f'{key}.pretrained={path!r} is not a directory; point it at a local '
                              'checkpoint directory, GGUF or ONNX file (nothing is downloaded)')
