# InternLM2-chat-7B (hub: internlm/internlm2-chat-7b). Loaded by the project's
# own transformers-5 implementation (dpa/models/internlm2): the checkpoint's
# safetensors and tokenizer.model are read, its .py files never run.
# `use_checkpoint_code=True` with `trust_remote_code=True` (llm and tokenizer)
# runs the checkpoint's own code instead; written for transformers 4.x, it
# breaks under 5.x (docs/families.md). The final model keeps the native format
# only: transformers' LLaVA class cannot hold InternLM2.
# Attention: sdpa, not flash-attn: the project's InternLM2 layers do not hand
# `position_ids` to the kernel, so flash-attn's variable-length path could not
# see where the samples of a packed stage-1 row begin (dpa/models/attention.py).
llm_path = '{checkpoint_root}/internlm2-chat-7b'
llm = dict(type='HFCausalLM', pretrained='{llm_path}', torch_dtype='bfloat16',
           attn_implementation='sdpa', trust_remote_code=False, use_checkpoint_code=False)
tokenizer = dict(type='HFTokenizer', pretrained='{llm_path}', trust_remote_code=False,
                 use_checkpoint_code=False)
# What `tiny_standin=True` builds instead (dpa/engine/standin.py): a random
# tiny InternLM2 with the published checkpoint's settings (config.json as of
# its March 2024 revision: rope_theta 1e6, no rope scaling, no biases,
# 32768 positions; sizes from TINY_LLM), saved and loaded back like the real
# checkpoint, and the real InternLM2 chat template.
llm_standin = dict(
    config=dict(
        model_type='internlm2',
        bias=False,
        rope_theta=1000000,
        rope_scaling=None,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        hidden_act='silu',
        tie_word_embeddings=False),
    tokenizer=dict(type='TinyTokenizer', family='internlm2'))
