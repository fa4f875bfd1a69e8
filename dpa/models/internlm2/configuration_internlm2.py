"""InternLM2's config, with the field names and defaults of the published
``configuration_internlm2.py`` (internlm/internlm2-chat-7b), so a checkpoint's
``config.json`` reads unchanged."""
import json
import logging
import os.path as osp
from typing import Optional

from mmengine.logging import print_log
from transformers import PretrainedConfig

ROPE_SCALING_TYPES = ('dynamic', 'linear')
DEFAULT_ROPE_THETA = 10000
# The model_type of InternLM2 snapshots published before 2024-01-24 (also
# InternLM's, version 1, a different architecture).
LEGACY_MODEL_TYPE = 'internlm'


class InternLM2Config(PretrainedConfig):
    """Args:
        vocab_size / hidden_size / intermediate_size / num_hidden_layers /
            num_attention_heads: the usual decoder sizes.
        num_key_value_heads: key/value heads of grouped-query attention
            (default: ``num_attention_heads``).
        hidden_act: activation of the gated MLP.
        max_position_embeddings: the length dynamic NTK scaling starts at.
        initializer_range: std of the normal init of linear and embedding weights.
        rms_norm_eps: epsilon of the RMS norms.
        bias: whether the attention projections (``wqkv``, ``wo``) have biases.
        rope_theta: rotary base (default 10000, or ``rope_parameters``' own).
        rope_scaling: None, or ``{'type': 'dynamic' | 'linear', 'factor': f}``
            with ``f >= 1`` (InternLM2's own format).
        rope_parameters: transformers 5's form of the same settings
            (``{'rope_type': ..., 'factor': ..., 'rope_theta': ...}``), which
            a config re-saved by transformers 5 holds instead of
            ``rope_scaling``; read into ``rope_theta`` and ``rope_scaling``.
    """
    model_type = 'internlm2'
    keys_to_ignore_at_inference = ['past_key_values']
    # A plain attribute, not PretrainedConfig's ``rope_scaling`` property: that
    # one rewrites the dict into transformers' ``rope_parameters`` format.
    rope_scaling = None

    def __init__(self,
                 vocab_size=103168,
                 hidden_size=4096,
                 intermediate_size=11008,
                 num_hidden_layers=32,
                 num_attention_heads=32,
                 num_key_value_heads=None,
                 hidden_act='silu',
                 max_position_embeddings=2048,
                 initializer_range=0.02,
                 rms_norm_eps=1e-6,
                 use_cache=True,
                 pad_token_id=0,
                 bos_token_id=1,
                 eos_token_id=2,
                 tie_word_embeddings=False,
                 bias=True,
                 rope_theta=None,
                 rope_scaling=None,
                 rope_parameters=None,
                 attn_implementation=None,
                 **kwargs):
        # The published config.json names its remote code; this class replaces
        # it, and a saved copy must not point at files it does not ship.
        kwargs.pop('auto_map', None)
        rope_theta, rope_scaling = rope_from_parameters(rope_parameters, rope_theta, rope_scaling)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = check_rope_scaling(rope_scaling)
        if hidden_size % num_attention_heads:
            raise ValueError(f'hidden_size ({hidden_size}) must be a multiple of '
                             f'num_attention_heads ({num_attention_heads})')
        if num_attention_heads % self.num_key_value_heads:
            raise ValueError(f'num_attention_heads ({num_attention_heads}) must be a multiple of '
                             f'num_key_value_heads ({self.num_key_value_heads})')
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         attn_implementation=attn_implementation, **kwargs)


def rope_from_parameters(rope_parameters: Optional[dict], rope_theta, rope_scaling):
    """``(rope_theta, rope_scaling)`` with transformers 5's ``rope_parameters``
    read in; a ValueError when the two forms disagree or the rope type is one
    InternLM2 does not have."""
    if rope_parameters is None:
        return (DEFAULT_ROPE_THETA if rope_theta is None else rope_theta), rope_scaling
    rope_type = rope_parameters.get('rope_type', rope_parameters.get('type', 'default'))
    if rope_type == 'default':
        scaling = None
    elif rope_type in ROPE_SCALING_TYPES:
        scaling = {'type': rope_type, 'factor': rope_parameters.get('factor')}
    else:
        raise ValueError(f'rope_parameters: rope_type {rope_type!r} is not one InternLM2 has '
                         f'(default, {", ".join(ROPE_SCALING_TYPES)})')
    if rope_scaling is not None and rope_scaling != scaling:
        raise ValueError(f'rope_scaling {rope_scaling!r} and rope_parameters {rope_parameters!r} '
                         'disagree: keep one of them in config.json')
    theta = rope_parameters.get('rope_theta', rope_theta)
    if rope_theta is not None and theta != rope_theta:
        raise ValueError(f'rope_theta {rope_theta} and rope_parameters.rope_theta {theta} '
                         'disagree: keep one of them in config.json')
    return (DEFAULT_ROPE_THETA if theta is None else theta), scaling


def legacy_internlm2_config(directory: str) -> Optional[InternLM2Config]:
    """The config of an InternLM2 snapshot from before 2024-01-24, whose
    config.json says ``model_type: "internlm"`` (renamed ``internlm2`` then;
    same architecture and fields), read as InternLM2's; None for any other
    directory. InternLM version 1 shares that model_type and is refused by name.
    """
    path = osp.join(directory, 'config.json')
    if not osp.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        config = json.load(f)
    if config.get('model_type') != LEGACY_MODEL_TYPE:
        return None
    names = list(config.get('architectures') or []) + [
        str(v) for v in (config.get('auto_map') or {}).values()]
    if not any('internlm2' in name.lower() for name in names):
        raise ValueError(f'{path}: model_type "internlm" without InternLM2 classes '
                         f'({names}) is InternLM version 1, which this project does not '
                         'implement; InternLM2 checkpoints name InternLM2ForCausalLM')
    print_log(f'{path}: model_type "internlm" (an InternLM2 snapshot from before 2024-01-24) '
              'read as "internlm2"', logger='current', level=logging.INFO)
    config.pop('model_type')
    return InternLM2Config.from_dict(config)


def check_rope_scaling(rope_scaling):
    """``rope_scaling`` as InternLM2 reads it, or a ValueError naming the problem."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict) or set(rope_scaling) != {'type', 'factor'}:
        raise ValueError("rope_scaling must be None or {'type': 'dynamic' | 'linear', 'factor': "
                         f'a number >= 1}}, got {rope_scaling!r}')
    if rope_scaling['type'] not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling['type'] must be one of {ROPE_SCALING_TYPES}, got "
                         f"{rope_scaling['type']!r}")
    factor = rope_scaling['factor']
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"rope_scaling['factor'] must be a number >= 1, got {factor!r}")
    return dict(rope_scaling)
