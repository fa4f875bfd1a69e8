# DPA on Qwen2.5-7B-Instruct exactly as fnlp-vision/DPA trains it: every switch
# of docs/fidelity.md at the reference's value (its per-device batches and
# lengths are the schedule bases' own).
_base_ = '../dpa_qwen2_5_7b.py'
model = dict(text_pass='masked')
proxy = dict(caption_suffix='\n')
align = dict(caption_suffix='\n', image_mode='square', loss=dict(scope='reference'))
finetune = dict(labels='reference', image_mode='pad', loss=dict(scope='reference'))
