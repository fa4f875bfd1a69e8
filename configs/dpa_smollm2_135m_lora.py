# configs/dpa_smollm2_135m.py with a LoRA stage 3 (docs/lora.md): adapters on
# every linear layer of the pretrained SmolLM2-135M-Instruct plus the projector
# in full, at LLaVA's ratio of rates (LoRA 10x the projector's, here 10x the
# full fine-tune's 5e-5); the final model is written merged, the adapter beside
# it. Stages 1-2 are the parent's: reuse a finished run's with
#   python tools/train.py configs/dpa_smollm2_135m_lora.py \
#     --cfg-options proxy.from_work_dir=work_dirs/dpa_smollm2_135m \
#                   align.from_work_dir=work_dirs/dpa_smollm2_135m
_base_ = './dpa_smollm2_135m.py'
finetune = dict(
    lora=dict(r=32, lora_alpha=64, lora_dropout=0.05, target_modules='all-linear'),
    projector_lr=5e-5,
    optim_wrapper=dict(optimizer=dict(lr=5e-4)))
