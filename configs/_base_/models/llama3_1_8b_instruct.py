# Llama-3.1-8B-Instruct (hub: meta-llama/Llama-3.1-8B-Instruct), transformers `llama`.
llm_path = '{checkpoint_root}/Llama-3.1-8B-Instruct'
# Attention: flash-attn where installed (on a GPU), else PyTorch's sdpa, with a
# logged reason (dpa/models/attention.py); one kernel: `attn_implementation=[sdpa]`.
llm = dict(type='HFCausalLM', pretrained='{llm_path}', torch_dtype='bfloat16',
           attn_implementation=['flash_attention_2', 'sdpa'])
tokenizer = dict(type='HFTokenizer', pretrained='{llm_path}')
# What `tiny_standin=True` builds instead (dpa/engine/standin.py): a random
# tiny llama with Llama-3.1's rope scaling, and the real header/eot template
# (dated system header, BOS from the template).
llm_standin = dict(
    config=dict(
        model_type='llama',
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type='llama3',
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192)),
    tokenizer=dict(type='TinyTokenizer', family='llama3_1'))
