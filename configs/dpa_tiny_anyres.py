# The embedded default with LLaVA-NeXT's dynamic resolution (AnyRes): each
# image is resized to the best-fitting grid below, cut into tiles of the vision
# tower's 32 px plus a downscaled base tile, and merged with un-padding and a
# learned image_newline (trained with the projector in stage 2, carried into
# stage 3). The final model is also written as transformers'
# LlavaNextForConditionalGeneration (artifact/hf_llava). See docs/anyres.md.
#   python tools/train.py configs/dpa_tiny_anyres.py
_base_ = ['dpa_tiny.py']
pad_to_square = False
# Rows x columns of 32 px tiles: 32x64, 64x32, 64x64, 32x96 and 96x32 pixels
# (max_tiles=4 keeps them all; a smaller one drops the larger grids).
anyres = dict(grid_shapes=[[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]], max_tiles=4)
