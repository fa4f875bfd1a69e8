# InternLM2-chat-7B (hub: internlm/internlm2-chat-7b): remote code, so the
# checkpoint's own modeling and tokenizer files run (`trust_remote_code`).
# Its final model keeps the native format only: transformers' LLaVA class
# cannot hold a remote-code LLM (the manifest says so).
llm_path = '{checkpoint_root}/internlm2-chat-7b'
llm = dict(type='HFCausalLM', pretrained='{llm_path}', torch_dtype='bfloat16',
           attn_implementation='eager', trust_remote_code=True)
tokenizer = dict(type='HFTokenizer', pretrained='{llm_path}', trust_remote_code=True)
# What `tiny_standin=True` builds instead (dpa/engine/standin.py): a random
# tiny InternLM2 (fused wqkv, dynamic NTK rope) loaded as remote code from
# dpa/models/remote_code/internlm2, and the real InternLM2 chat template.
llm_standin = dict(
    config=dict(
        model_type='internlm2',
        bias=False,
        rope_theta=1000000,
        rope_scaling=dict(type='dynamic', factor=2.0)),
    tokenizer=dict(type='TinyTokenizer', family='internlm2'))
