# The tiny default with captions in a style of their own ("top: circle, red."):
# the captions' language conflicts with the instruction answers', as DPA assumes.
_base_ = '../dpa_tiny.py'
synthetic_data = dict(root='data/dpa_tiny_terse', caption_style='terse')
