# The reference implementation (fnlp-vision/DPA), faithfully, on the tiny
# default: every switch of docs/fidelity.md at the reference's value.
_base_ = '../dpa_tiny.py'
# CMO's no-image pass: full length, image positions masked (the first caption
# token's text-only score is read at the last image position), smoothing over
# the flattened batch.
model = dict(text_pass='masked')
proxy = dict(caption_suffix='\n')
align = dict(caption_suffix='\n', image_mode='square', loss=dict(scope='reference'))
finetune = dict(labels='reference', image_mode='pad', loss=dict(scope='reference'))
