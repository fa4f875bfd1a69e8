# Images of coloured shapes with captions, instruction conversations (30%
# text-only) and a held-out evaluation split (multiple-choice questions about
# colour, shape and position, on images no training row shows), generated
# deterministically under `synthetic_data.root` on first use; the pipeline
# points `caption_data`, `instruct_data` and `eval` at them. `caption_style`:
# 'plain' (worded as the instruction answers) or 'terse' ("top: circle, red.",
# a style of their own, the setting DPA is for).
# Your own data wins: a dataset given data_files reads them, the synthetic data
# fills only the others (and `eval` without eval.data), e.g.
#   --cfg-options "caption_data.data_files=[/data/captions.json]" \
#       caption_data.image_folder=/data/images
# (the same for instruct_data; eval.data and eval.image_folder for the eval stage).
synthetic_data = dict(root='data/dpa_tiny', num_captions=64, num_instructions=48,
                      num_eval=48, image_size=64, seed=0, caption_style='plain')
caption_data = dict(data_files=[], image_folder='')
instruct_data = dict(data_files=[], image_folder='')
# Read by the `eval` stage when a config lists it (empty data: the synthetic split).
eval = dict(data='', image_folder='', batch_size=16)
