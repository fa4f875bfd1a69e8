"""InternLM2's config, with the field names and defaults of the published
``configuration_internlm2.py`` (internlm/internlm2-chat-7b), so a checkpoint's
``config.json`` reads unchanged."""
from transformers import PretrainedConfig

ROPE_SCALING_TYPES = ('dynamic', 'linear')


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
        rope_theta: rotary base.
        rope_scaling: None, or ``{'type': 'dynamic' | 'linear', 'factor': f}``
            with ``f >= 1`` (InternLM2's own format, not transformers'
            ``rope_parameters``).
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
                 rope_theta=10000,
                 rope_scaling=None,
                 attn_implementation=None,
                 **kwargs):
        # The published config.json names its remote code; this class replaces
        # it, and a saved copy must not point at files it does not ship.
        kwargs.pop('auto_map', None)
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
