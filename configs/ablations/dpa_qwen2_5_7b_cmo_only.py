# Ablation: CMO weights without the proxy LLM (align against the original LLM).
_base_ = '../dpa_qwen2_5_7b.py'
stages = ['align', 'finetune']
align = dict(use_proxy=False)
