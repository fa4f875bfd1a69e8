# Ablation: the proxy LLM (PMO) without CMO weights.
_base_ = '../dpa_qwen2_5_7b.py'
align = dict(loss=dict(mode='vanilla'))
finetune = dict(loss=dict(mode='vanilla'))
