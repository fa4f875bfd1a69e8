# Ablation: DPA with CMO in stage 2 only; stage 3 learns with plain CE.
_base_ = '../dpa_qwen2_5_7b.py'
finetune = dict(loss=dict(mode='vanilla'))
