"""A compact InternLM2 for tiny random stand-ins, loaded as remote code.

Parameter names and the fused ``wqkv`` layout are those of
internlm/internlm2-chat-7b's ``modeling_internlm2.py`` (``tok_embeddings``,
``attention.wqkv``/``wo``, ``feed_forward.w1``/``w3``/``w2``,
``attention_norm``, ``ffn_norm``, ``output``), so LoRA, merging and saving
meet the same module tree as with the real checkpoint. Eager attention, no KV
cache: it trains and scores, it is not meant for fast generation. The
``config.json`` beside it has internlm2-chat-7b's settings at the stand-in's
tiny sizes.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_internlm2 import InternLM2Config


class InternLM2RMSNorm(nn.Module):

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


def rotary_cos_sin(config, position_ids, dtype):
    """cos/sin of the rotary embedding at ``position_ids``, with InternLM2's
    dynamic NTK scaling when ``rope_scaling={'type': 'dynamic', ...}``."""
    dim = config.hidden_size // config.num_attention_heads
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    seq_len = int(position_ids.max()) + 1
    if scaling.get('type') == 'dynamic' and seq_len > config.max_position_embeddings:
        factor = scaling['factor']
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (
            dim / (dim - 2))
    elif scaling and scaling.get('type') != 'dynamic':
        raise NotImplementedError(f'rope_scaling {scaling} is not supported by this stand-in')
    inv_freq = 1.0 / (base**(torch.arange(0, dim, 2, device=position_ids.device).float() / dim))
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class InternLM2MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.wqkv = nn.Linear(config.hidden_size,
                              (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                              bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, hidden_states, additive_mask, cos, sin):
        batch, length, _ = hidden_states.shape
        # Per key/value head: its query heads, then its key, then its value.
        qkv = self.wqkv(hidden_states).view(batch, length, self.num_key_value_heads,
                                            self.num_key_value_groups + 2, self.head_dim)
        query = qkv[..., :self.num_key_value_groups, :].reshape(batch, length, self.num_heads,
                                                                 self.head_dim).transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        key = key.repeat_interleave(self.num_key_value_groups, dim=1)
        value = value.repeat_interleave(self.num_key_value_groups, dim=1)
        scores = query @ key.transpose(2, 3) / math.sqrt(self.head_dim) + additive_mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = (probs @ value).transpose(1, 2).reshape(batch, length, -1)
        return self.wo(out)


class InternLM2DecoderLayer(GradientCheckpointingLayer):

    def __init__(self, config):
        super().__init__()
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, additive_mask, cos, sin):
        hidden_states = hidden_states + self.attention(self.attention_norm(hidden_states),
                                                       additive_mask, cos, sin)
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states))


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = 'model'
    supports_gradient_checkpointing = True
    _no_split_modules = ['InternLM2DecoderLayer']


class InternLM2Model(InternLM2PreTrainedModel):

    def __init__(self, config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                           config.pad_token_id)
        self.layers = nn.ModuleList(
            [InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
        # Causal over sequence order, and no attention to masked-out keys.
        allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        allowed = allowed.unsqueeze(0).expand(batch, -1, -1)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool().unsqueeze(1)
        additive_mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=device)
        additive_mask = additive_mask.masked_fill(
            ~allowed, torch.finfo(inputs_embeds.dtype).min).unsqueeze(1)
        cos, sin = rotary_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, additive_mask, cos, sin)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states))


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config):
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

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids,
                                   inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.output(hidden_states).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab_size),
                                   labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
