# Ablation: CMO weights without the proxy LLM (align against the original LLM).
_base_ = '../dpa_tiny.py'
stages = ['align', 'finetune']
align = dict(use_proxy=False)
