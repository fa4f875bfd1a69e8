# Ablation: stage 3 starts from the proxy LLM (base + merged stage-1 LoRA)
# instead of the original LLM.
_base_ = '../dpa_qwen2_5_7b.py'
finetune = dict(init_from_proxy=True)
