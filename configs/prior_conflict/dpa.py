# The controlled language-prior-conflict benchmark (docs/prior_conflict.md):
# DPA on a tiny prior LLM pre-trained on style A, captions in style B, seen
# through a random tiny CLIP. The data and the prior LLM are made by
# tools/prior_conflict.py under {data_root}/prior_conflict/ (cached); the
# variants inherit this file.
_base_ = ['./_common.py', '../_base_/models/tiny_clip.py']
