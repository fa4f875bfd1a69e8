# The reference implementation's CMO, faithfully: the masked full-length
# no-image pass and smoothing over the flattened batch.
_base_ = '../dpa_tiny.py'
model = dict(text_pass='masked')
align = dict(loss=dict(scope='reference'))
finetune = dict(loss=dict(scope='reference'))
