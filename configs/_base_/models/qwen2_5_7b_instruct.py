# Qwen2.5-7B-Instruct (hub: Qwen/Qwen2.5-7B-Instruct).
_base_ = ['qwen2_5_instruct.py']
llm_path = '{checkpoint_root}/Qwen2.5-7B-Instruct'
