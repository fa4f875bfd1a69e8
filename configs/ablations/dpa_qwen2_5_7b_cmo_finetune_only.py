# Ablation: DPA with CMO in stage 3 only; stage 2 aligns with plain CE.
_base_ = '../dpa_qwen2_5_7b.py'
align = dict(loss=dict(mode='vanilla'))
