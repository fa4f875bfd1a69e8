# PixMo-Cap (hub dataset allenai/pixmo-cap): dense human-spoken captions of
# web images, read by stages 1 and 2. It ships as (image URL, caption) rows:
# download the images, then convert with
#   python tools/data/pixmo_cap_to_llava.py ROWS.parquet {data_root}/pixmo-cap/images \
#       {data_root}/pixmo-cap/pixmo_cap_llava.json
caption_data = dict(
    type='LLaVAMixture',
    sources=dict(
        pixmo_cap=dict(
            data_files=['{data_root}/pixmo-cap/pixmo_cap_llava.json'],
            image_folder='{data_root}/pixmo-cap/images',
            ratio=1.0)),
    seed=0)
