# LLaVA-format data on local disk. Stage 1 reads the captions' text, stage 2
# the image-caption pairs (e.g. BLIP-LCS-558k's blip_laion_cc_sbu_558k.json),
# stage 3 the instruction data (json or jsonl, rows with or without an image).
# `{data_root}` is filled in when the run starts, so `data_root` set in a
# child config or with --cfg-options moves every path.
data_root = 'data/llava'
caption_data = dict(
    data_files=['{data_root}/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'],
    image_folder='{data_root}/LLaVA-Pretrain/images')
instruct_data = dict(
    data_files=['{data_root}/llava_v1_5_mix665k.json'],
    image_folder='{data_root}/images')
