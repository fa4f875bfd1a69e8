# Baseline: plain LLaVA training against the prior LLM, unweighted CE.
_base_ = './dpa.py'
stages = ['align', 'finetune', 'eval']
align = dict(use_proxy=False, loss=dict(mode='vanilla'))
finetune = dict(loss=dict(mode='vanilla'))
