# Ablation: the proxy LLM (PMO) without CMO weights.
_base_ = './dpa.py'
align = dict(loss=dict(mode='vanilla'))
finetune = dict(loss=dict(mode='vanilla'))
