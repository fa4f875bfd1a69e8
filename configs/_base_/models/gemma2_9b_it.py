# Gemma-2-9B-it (hub: google/gemma-2-9b-it), transformers `gemma2`. Its chat
# template has no system role (a system turn raises).
# Attention must apply Gemma-2's attention-logit soft-capping. In transformers
# 5.24 `eager`, `flash_attention_2` (flash-attn >= 2.6) and `flex_attention` do;
# `sdpa` refuses it (Gemma-2 declares `_supports_sdpa = False`). So: flash-attn
# where installed (on a GPU), else eager, with a logged reason
# (dpa/models/attention.py).
llm_path = '{checkpoint_root}/gemma-2-9b-it'
llm = dict(type='HFCausalLM', pretrained='{llm_path}', torch_dtype='bfloat16',
           attn_implementation=['flash_attention_2', 'eager'])
tokenizer = dict(type='HFTokenizer', pretrained='{llm_path}')
# What `tiny_standin=True` builds instead (dpa/engine/standin.py): a random
# tiny gemma2 with the family's final and attention logit soft-capping, tied
# and sqrt(hidden)-scaled embeddings, alternating sliding-window layers and
# query scaling by the head size (head_dim is the stand-in's 32 / 4 heads).
llm_standin = dict(
    config=dict(
        model_type='gemma2',
        head_dim=8,
        query_pre_attn_scalar=8,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        sliding_window=4096,
        hidden_activation='gelu_pytorch_tanh',
        tie_word_embeddings=True),
    tokenizer=dict(type='TinyTokenizer', family='gemma2'))
