# Baseline: CAL, logit-score weights clamped to [1, 5], no proxy LLM.
_base_ = './dpa.py'
stages = ['align', 'finetune', 'eval']
align = dict(use_proxy=False, loss=dict(mode='cal', clamp=(1.0, 5.0)))
finetune = dict(loss=dict(mode='cal', clamp=(1.0, 5.0)))
