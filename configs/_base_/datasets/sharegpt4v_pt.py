# ShareGPT4V-PT (hub dataset Lin-Chen/ShareGPT4V): 1.2M detailed captions by
# Share-Captioner of COCO, LAION/CC/SBU (LLaVA-Pretrain) and SAM images, read
# by stages 1 and 2. Local layout as in ShareGPT4V's data preparation:
# {data_root}/ShareGPT4V/share-captioner_coco_lcs_sam_1246k_1107.json, images
# under {data_root}/ShareGPT4V/data/ (coco/, llava/llava_pretrain/, sam/).
caption_data = dict(
    type='LLaVAMixture',
    sources=dict(
        sharegpt4v_pt=dict(
            data_files=['{data_root}/ShareGPT4V/share-captioner_coco_lcs_sam_1246k_1107.json'],
            image_folder='{data_root}/ShareGPT4V/data',
            ratio=1.0)),
    seed=0)
