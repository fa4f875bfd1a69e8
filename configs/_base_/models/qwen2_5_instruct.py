# The Qwen2.5-Instruct family (transformers `qwen2`). A size file sets
# `llm_path`, a local checkpoint directory (nothing is downloaded).
# Attention: flash-attn where installed (on a GPU), else PyTorch's sdpa, with a
# logged reason (dpa/models/attention.py); one kernel: `attn_implementation=[sdpa]`.
llm = dict(type='HFCausalLM', pretrained='{llm_path}', torch_dtype='bfloat16',
           attn_implementation=['flash_attention_2', 'sdpa'])
tokenizer = dict(type='HFTokenizer', pretrained='{llm_path}')
# What `tiny_standin=True` builds instead (dpa/engine/standin.py): a random
# tiny qwen2 (biased q/k/v, rope theta 1e6) with the real ChatML template and
# its default system prompt.
llm_standin = dict(
    config=dict(
        model_type='qwen2',
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type='default', rope_theta=1000000.0)),
    tokenizer=dict(type='TinyTokenizer', family='qwen2_5'))
