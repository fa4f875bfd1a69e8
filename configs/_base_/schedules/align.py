# Stage 2: the projector alone learns image -> caption against the frozen,
# merged proxy LLM (`use_proxy=False`: against the original LLM), with CMO.
align = dict(
    data='caption_data',
    use_proxy=True,
    loss=dict(mode='cmo', clamp=(0.05, 0.5), window=3, scope='sequence'),
    caption_suffix='eos',
    # 'pad' or 'square' (the processor's resize and centre crop, the reference's
    # stage 2); None: as `pad_to_square`.
    image_mode=None,
    # Per device: the reference's scripts/pretrain_lvlm.sh.
    max_length=8192,
    batch_size=32,
    global_batch_size=256,
    max_epochs=1,
    warmup_ratio=0.03,
    optim_wrapper=dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.0),
        clip_grad=dict(max_norm=1.0)),
    checkpoint_interval=500)
