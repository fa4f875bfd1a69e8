# A random tiny LLM of the Qwen2 architecture, with the word-level tokenizer of
# the synthetic data. A real LLM is a local checkpoint directory:
#   llm = dict(type='HFCausalLM', pretrained='/ckpt/Qwen2.5-7B-Instruct', torch_dtype='bfloat16')
#   tokenizer = dict(type='HFTokenizer', pretrained='/ckpt/Qwen2.5-7B-Instruct')
llm = dict(
    type='HFCausalLM',
    config=dict(
        model_type='qwen2',
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False),
    torch_dtype='float32')
tokenizer = dict(type='TinyTokenizer')
