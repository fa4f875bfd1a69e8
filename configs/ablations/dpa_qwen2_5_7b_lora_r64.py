# Ablation: proxy LoRA rank 64 (alpha = 2 x rank; the paper's default is 256).
_base_ = '../dpa_qwen2_5_7b.py'
proxy = dict(lora=dict(r=64, lora_alpha=128))
