"""Builders of the Hugging Face parts, registered under names so configs stay
plain data: ``dict(type='HFCausalLM', pretrained='/ckpt/llm')`` loads a local
checkpoint, ``dict(type='HFCausalLM', config=dict(model_type='qwen2', ...))``
builds a random stand-in with the same architecture (seeded, so every stage
and process builds the same weights)."""
import contextlib
import os.path as osp
from typing import Optional

import torch
import transformers
from mmengine.registry import Registry
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                          AutoTokenizer)

from dpa.registry import MODELS

# Tokenizers and image processors are not nn.Modules: they get their own registry.
PROCESSORS = Registry('processor', locations=['dpa.models'])
IMAGE_TOKEN = '<image>'
REMOTE_CODE_STANDINS = {
    'internlm2': osp.join(osp.dirname(osp.abspath(__file__)), 'remote_code', 'internlm2'),
}


def _dtype(name):
    return getattr(torch, name) if isinstance(name, str) else name


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def hf_config(pretrained: Optional[str] = None, config: Optional[dict] = None,
              trust_remote_code: bool = False):
    """The transformers config of a component, read without loading weights."""
    if (pretrained is None) == (config is None):
        raise ValueError('give exactly one of `pretrained` (a local checkpoint directory) '
                         'or `config` (a dict with `model_type` for a random stand-in)')
    if pretrained is not None:
        return AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    config = dict(config)
    model_type = config.pop('model_type')
    if model_type in REMOTE_CODE_STANDINS:
        # Families transformers does not know: a config directory with their
        # modeling code, loaded as remote code like the real checkpoint.
        return AutoConfig.from_pretrained(REMOTE_CODE_STANDINS[model_type],
                                          trust_remote_code=trust_remote_code, **config)
    return AutoConfig.for_model(model_type, **config)


@MODELS.register_module()
def HFCausalLM(pretrained: Optional[str] = None,
               config: Optional[dict] = None,
               torch_dtype: str = 'float32',
               attn_implementation: str = 'sdpa',
               trust_remote_code: bool = False,
               init_seed: int = 0):
    """Any ``AutoModelForCausalLM``, from a local checkpoint or a config."""
    dtype = _dtype(torch_dtype)
    if pretrained is not None:
        return AutoModelForCausalLM.from_pretrained(
            pretrained, dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code)
    cfg = hf_config(config=config, trust_remote_code=trust_remote_code)
    cfg._attn_implementation = attn_implementation
    with _seeded(init_seed):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                trust_remote_code=trust_remote_code)


def _vision_config(cfg):
    # A full CLIP/SigLIP checkpoint holds text and vision towers: keep the vision one.
    return getattr(cfg, 'vision_config', None) or cfg


@MODELS.register_module()
def HFVisionModel(pretrained: Optional[str] = None,
                  config: Optional[dict] = None,
                  torch_dtype: str = 'float32',
                  init_seed: int = 0):
    """The vision tower of a CLIP/SigLIP-like checkpoint (``AutoModel`` class of
    its vision config)."""
    vision_cfg = _vision_config(hf_config(pretrained, config))
    model_cls = AutoModel._model_mapping[type(vision_cfg)]
    if pretrained is not None:
        return model_cls.from_pretrained(pretrained, config=vision_cfg, dtype=_dtype(torch_dtype))
    with _seeded(init_seed):
        return model_cls(vision_cfg).to(_dtype(torch_dtype))


def num_image_tokens(vision_cfg: dict) -> int:
    """How many tokens one image becomes under an ``HFVisionTower`` config,
    read from the HF config alone (no weights loaded)."""
    cfg = _vision_config(hf_config(vision_cfg.get('pretrained'), vision_cfg.get('config')))
    feature_select = vision_cfg.get('feature_select', 'patch')
    patches = (cfg.image_size // cfg.patch_size) ** 2
    has_cls = cfg.model_type.startswith('clip')
    if feature_select == 'patch':
        return patches
    if feature_select == 'full':
        return patches + int(has_cls)
    raise ValueError(f"vision_tower.feature_select must be 'patch' or 'full', got {feature_select!r}")


@PROCESSORS.register_module()
def HFTokenizer(pretrained: str, trust_remote_code: bool = False, **kwargs):
    """A local tokenizer, with the ``<image>`` placeholder token added."""
    tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code,
                                              **kwargs)
    return with_image_token(tokenizer)


@PROCESSORS.register_module()
def TinyTokenizer(family: Optional[str] = None):
    """The word-level tokenizer of the embedded tiny default; with ``family``,
    the stand-in of that family's tokenizer (its special tokens and chat
    template, see :mod:`dpa.models.chat_templates`)."""
    from dpa.models.tiny_tokenizer import build_tiny_tokenizer
    return with_image_token(build_tiny_tokenizer(family))


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
    if pretrained is not None:
        return AutoImageProcessor.from_pretrained(pretrained)
    config = dict(config)
    return getattr(transformers, config.pop('image_processor_type'))(**config)
