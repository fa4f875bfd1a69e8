# Ablation: CMO weight bounds [0.05, 1.0] (paper default [0.05, 0.5]): no cap.
_base_ = '../dpa_qwen2_5_7b.py'
align = dict(loss=dict(clamp=(0.05, 1.0)))
finetune = dict(loss=dict(clamp=(0.05, 1.0)))
