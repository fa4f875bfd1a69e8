# The embedded default with a LoRA stage 3: adapters (with dropout) on the
# original tiny LLM and the projector in full, the projector at its own
# learning rate as LLaVA's finetune_lora.sh (LoRA lr 10x the projector's);
# the final model is written merged, the adapter beside it (docs/lora.md).
_base_ = '../dpa_tiny.py'
finetune = dict(
    lora=dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules='all-linear'),
    projector_lr=4e-5,
    optim_wrapper=dict(optimizer=dict(lr=4e-4)))
