# Stage 3: the ORIGINAL LLM (`init_from_proxy=True`: the proxy) and the stage-2
# projector train on instruction data with the LLM's chat template, with CMO.
finetune = dict(
    data='instruct_data',
    init_from_proxy=False,
    loss=dict(mode='cmo', clamp=(0.05, 0.5), window=3, scope='sequence'),
    # LLaVA's group_by_modality_length: batches of image rows or of text-only
    # rows, of similar lengths.
    group_by_modality_length=True,
    max_length=2048,
    batch_size=16,
    global_batch_size=256,
    max_epochs=1,
    warmup_ratio=0.03,
    optim_wrapper=dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.0),
        clip_grad=dict(max_norm=1.0)),
    checkpoint_interval=500)
