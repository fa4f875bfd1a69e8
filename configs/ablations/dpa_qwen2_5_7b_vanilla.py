# Baseline: plain LLaVA training on Qwen2.5-7B, no proxy LLM, unweighted CE.
_base_ = '../dpa_qwen2_5_7b.py'
stages = ['align', 'finetune']
align = dict(use_proxy=False, loss=dict(mode='vanilla'))
finetune = dict(loss=dict(mode='vanilla'))
