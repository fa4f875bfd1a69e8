# Stage 3: the ORIGINAL LLM (`init_from_proxy=True`: the proxy) and the stage-2
# projector train on instruction data with the LLM's chat template, with CMO.
finetune = dict(
    data='instruct_data',
    init_from_proxy=False,
    loss=dict(mode='cmo', clamp=(0.05, 0.5), window=3, scope='sequence'),
    # LLaVA's group_by_modality_length: batches of image rows or of text-only
    # rows, of similar lengths.
    group_by_modality_length=True,
    # 'assistant' (the tokenizer's chat template, answers and their end-of-turn
    # token learnt) or 'reference' (fnlp-vision/DPA's templates and masking).
    labels='assistant',
    # 'pad' or 'square'; None: as `pad_to_square` (which the export and the
    # eval stage follow, so a set value must agree with it).
    image_mode=None,
    # Per device: the reference's scripts/finetune_lvlm.sh.
    max_length=2048,
    batch_size=8,
    global_batch_size=256,
    max_epochs=1,
    warmup_ratio=0.03,
    # `lora=dict(r=128, lora_alpha=256, lora_dropout=0.05,
    # target_modules='all-linear')` (peft.LoraConfig arguments) trains LoRA
    # adapters on the LLM instead of the whole LLM (LLaVA's --lora_enable,
    # docs/lora.md); the projector trains in full; the final model is written
    # merged, the adapter beside it. Absent: the whole LLM trains.
    # The projector's own learning rate (LLaVA's mm_projector_lr); None: the
    # optimizer's lr.
    projector_lr=None,
    optim_wrapper=dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.0),
        clip_grad=dict(max_norm=1.0)),
    checkpoint_interval=500)
