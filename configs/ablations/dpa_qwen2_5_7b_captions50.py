# Ablation: data size, 50% of BLIP-LCS-558K per epoch for stages 1-2 (a seeded
# random subset, the same in both stages).
_base_ = '../dpa_qwen2_5_7b.py'
caption_data = dict(sources=dict(blip_lcs_558k=dict(ratio=0.5)))
