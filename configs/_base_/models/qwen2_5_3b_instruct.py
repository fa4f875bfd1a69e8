# Qwen2.5-3B-Instruct (hub: Qwen/Qwen2.5-3B-Instruct).
_base_ = ['qwen2_5_instruct.py']
llm_path = '{checkpoint_root}/Qwen2.5-3B-Instruct'
# The small sizes share the input and output embeddings.
llm_standin = dict(config=dict(tie_word_embeddings=True))
