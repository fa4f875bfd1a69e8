# BLIP-LCS-558K (hub dataset liuhaotian/LLaVA-Pretrain): LAION/CC/SBU images
# with BLIP captions, LLaVA-1.5's alignment set, read by stages 1 and 2.
# Local layout: {data_root}/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json and
# {data_root}/LLaVA-Pretrain/images/ (unzipped images.zip).
caption_data = dict(
    type='LLaVAMixture',
    sources=dict(
        blip_lcs_558k=dict(
            data_files=['{data_root}/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'],
            image_folder='{data_root}/LLaVA-Pretrain/images',
            ratio=1.0)),
    seed=0)
