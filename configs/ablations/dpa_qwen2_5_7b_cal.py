# Baseline: CAL (Xiao et al., 2024): logit-score weights clamped to [1, 5], no proxy LLM.
_base_ = '../dpa_qwen2_5_7b.py'
stages = ['align', 'finetune']
align = dict(use_proxy=False, loss=dict(mode='cal', clamp=(1.0, 5.0)))
finetune = dict(loss=dict(mode='cal', clamp=(1.0, 5.0)))
