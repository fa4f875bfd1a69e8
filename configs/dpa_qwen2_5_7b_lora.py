# DPA on Qwen2.5-7B-Instruct with a LoRA stage 3, every stage on ONE 80 GB GPU:
#   python tools/train.py configs/dpa_qwen2_5_7b_lora.py
# Stage 3 trains LoRA adapters on the original LLM (LLaVA's finetune_lora.sh:
# r 128, alpha 256, dropout 0.05, every linear layer, lr 2e-4, projector lr
# 2e-5) and the projector in full; the frozen LLM stays in bf16. The final
# model is written merged (every reader loads it unchanged), the adapter
# beside it. tools/plan_memory.py configs/dpa_qwen2_5_7b_lora.py --gpus 1
# --gpu-memory 80 gives the per-stage estimate (docs/lora.md).
_base_ = './dpa_qwen2_5_7b.py'
strategy = None  # one process: nothing to shard
# Per-device batches that fit one GPU; gradient accumulation keeps the global
# batch of 256 (checkpoints fall on optimizer steps: multiples of it).
proxy = dict(batch_size=2, checkpoint_interval=512)
align = dict(batch_size=16, checkpoint_interval=512)
finetune = dict(
    lora=dict(r=128, lora_alpha=256, lora_dropout=0.05, target_modules='all-linear'),
    projector_lr=2e-5,
    batch_size=8,
    checkpoint_interval=512,
    optim_wrapper=dict(optimizer=dict(lr=2e-4)))
