# A caption mixture: all of BLIP-LCS-558K and half of ShareGPT4V-PT (a seeded
# random half) per epoch; see dpa/datasets/mixture.py for the epoch length.
_base_ = ['blip_lcs_558k.py']
caption_data = dict(
    sources=dict(
        sharegpt4v_pt=dict(
            data_files=['{data_root}/ShareGPT4V/share-captioner_coco_lcs_sam_1246k_1107.json'],
            image_folder='{data_root}/ShareGPT4V/data',
            ratio=0.5)))
