"""InternLM2 as a transformers-5 model, written from the architecture.

The module tree and parameter names are those of the published checkpoints
(``model.tok_embeddings``, ``model.layers.N.attention.wqkv`` / ``wo``,
``feed_forward.w1`` / ``w3`` / ``w2``, ``attention_norm``, ``ffn_norm``,
``model.norm``, ``output``), so their safetensors load unchanged. The fused
``wqkv`` projection is grouped per key/value head: for each of them its query
heads, then its key head, then its value head.

What differs from the checkpoints' own code (written for transformers 4.x),
see docs/families.md:

- rotary cos/sin are computed from ``position_ids`` at every call, with no
  buffer and no length-sized table: ids beyond the sequence length work, and
  ``from_pretrained`` has nothing left uninitialised. Dynamic NTK scaling
  takes the length as the largest position id + 1 (the published code takes
  the key count, which is the same for unpadded inputs);
- attention goes through transformers' attention interface (eager, sdpa, ...)
  and masks (``create_causal_mask``), so position-id restarts of a packed row
  without ``attention_mask`` separate its samples, as in transformers' Llama;
- generation uses transformers' ``Cache`` (``DynamicCache``), including
  generation from ``inputs_embeds``;
- logits keep the LM head's dtype (the published code casts them to float32).
"""
import math
from typing import Callable, Optional

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_internlm2 import InternLM2Config


class InternLM2RMSNorm(nn.Module):
    """RMS norm computed in float32, scaled in the input's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


def rotary_inverse_frequencies(config: InternLM2Config, seq_len: int,
                               device: torch.device) -> torch.Tensor:
    """The rotary inverse frequencies for a sequence of ``seq_len`` positions
    (dynamic NTK scaling raises the base once ``seq_len`` exceeds
    ``max_position_embeddings``)."""
    dim = config.hidden_size // config.num_attention_heads
    base = config.rope_theta
    scaling = config.rope_scaling
    if scaling is not None and scaling['type'] == 'dynamic' \
            and seq_len > config.max_position_embeddings:
        factor = scaling['factor']
        base = base * ((factor * seq_len / config.max_position_embeddings) -
                       (factor - 1))**(dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponents)


def rotary_cos_sin(config: InternLM2Config, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of the rotary angles at ``position_ids`` (batch, length),
    each (batch, 1, length, head_dim), in ``dtype``."""
    seq_len = int(position_ids.max()) + 1
    inv_freq = rotary_inverse_frequencies(config, seq_len, position_ids.device)
    positions = position_ids.float()
    scaling = config.rope_scaling
    if scaling is not None and scaling['type'] == 'linear':
        positions = positions / scaling['factor']
    # float32 angles whatever the model dtype: bfloat16 positions lose integers above 256.
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = positions.unsqueeze(-1) * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype).unsqueeze(1), angles.sin().to(dtype).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, length, dim) -> (batch, kv_heads * n_rep, length, dim)."""
    if n_rep == 1:
        return hidden_states
    return hidden_states.repeat_interleave(n_rep, dim=1)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                            scaling: float, dropout: float = 0.0, **kwargs):
    """Softmax attention in float32 over an additive mask, operation for
    operation as the published code computes it (it divides by
    sqrt(head_dim) where transformers multiplies by ``scaling``: the last bit
    differs)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(module.head_dim)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class InternLM2Attention(nn.Module):
    """Grouped-query attention with InternLM2's fused ``wqkv`` projection."""

    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.wqkv = nn.Linear(config.hidden_size,
                              (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                              bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask,
                cache: Optional[Cache] = None, **kwargs):
        batch, length, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states).view(batch, length, self.num_key_value_heads,
                                            self.num_key_value_groups + 2, self.head_dim)
        query = qkv[..., :self.num_key_value_groups, :].reshape(
            batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)
        cos, sin = position_embeddings
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                 dropout=0.0, **kwargs)
        return self.wo(out.reshape(batch, length, -1).contiguous()), weights


class InternLM2MLP(nn.Module):
    """Gated MLP: ``w2(act(w1 x) * w3 x)``."""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention and MLP blocks with residuals."""

    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                cache: Optional[Cache] = None, **kwargs) -> torch.Tensor:
        attended, _ = self.attention(self.attention_norm(hidden_states), position_embeddings,
                                     attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states))


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    config: InternLM2Config
    base_model_prefix = 'model'
    supports_gradient_checkpointing = True
    _no_split_modules = ['InternLM2DecoderLayer']
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, InternLM2RMSNorm):
            nn.init.ones_(module.weight)


class InternLM2Model(InternLM2PreTrainedModel):
    """The decoder: embeddings, layers and final norm."""

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    @deprecate_kwarg('past_key_values', '5.40.0', new_name='cache')
    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError('give exactly one of input_ids or inputs_embeds')
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
                            + seen).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                  attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        position_embeddings = rotary_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask,
                                  position_embeddings=position_embeddings, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """The decoder and its LM head ``output``."""
    # Tied only where the config says ``tie_word_embeddings`` (the published
    # checkpoints do not tie).
    _tied_weights_keys = {'output.weight': 'model.tok_embeddings.weight'}

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    @deprecate_kwarg('past_key_values', '5.40.0', new_name='cache')
    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, **kwargs)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.output(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
