# Ablation: CMO weights without the proxy LLM.
_base_ = './dpa.py'
stages = ['align', 'finetune', 'eval']
align = dict(use_proxy=False)
