# Baseline: plain LLaVA training, no proxy LLM, unweighted CE.
_base_ = '../dpa_tiny.py'
stages = ['align', 'finetune']
align = dict(use_proxy=False, loss=dict(mode='vanilla'))
finetune = dict(loss=dict(mode='vanilla'))
