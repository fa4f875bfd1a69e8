# Stage 1 (PMO): LoRA on the LLM, trained on the captions' text alone.
proxy = dict(
    data='caption_data',
    lora=dict(r=256, lora_alpha=512, lora_dropout=0.0, target_modules='all-linear'),
    loss=dict(mode='vanilla'),
    # Several captions per row, attention kept inside each: the losses of
    # padded batches, with fewer padding tokens.
    pack=True,
    # The caption's ending: 'eos' (the tokenizer's EOS) or '\n' (the reference's
    # LLaVA plain template); see docs/fidelity.md.
    caption_suffix='eos',
    # Per device: the reference's scripts/pretrain.sh (model_max_length 8192).
    max_length=8192,
    batch_size=16,
    global_batch_size=256,
    max_epochs=1,
    warmup_ratio=0.03,
    optim_wrapper=dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.0),
        clip_grad=dict(max_norm=1.0)),
    checkpoint_interval=500)
