# Ablation: CMO weight bounds [0.1, 0.5] (paper default [0.05, 0.5]).
_base_ = '../dpa_qwen2_5_7b.py'
align = dict(loss=dict(clamp=(0.1, 0.5)))
finetune = dict(loss=dict(clamp=(0.1, 0.5)))
