# Images of coloured shapes with captions, and instruction conversations (30%
# text-only), generated deterministically under `synthetic_data.root` on first
# use; the pipeline points `caption_data` and `instruct_data` at them.
synthetic_data = dict(root='data/dpa_tiny', num_captions=64, num_instructions=48,
                      image_size=64, seed=0)
caption_data = dict(data_files=[], image_folder='')
instruct_data = dict(data_files=[], image_folder='')
