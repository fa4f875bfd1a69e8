# DPA on Qwen2.5-7B-Instruct + CLIP ViT-L/14-336 with LLaVA-NeXT's dynamic
# resolution (AnyRes, mm_patch_merge_type='spatial_unpad'): LLaVA-NeXT's grid
# pinpoints for CLIP-L/336, i.e. 336x672, 672x336, 672x672, 1008x336 and
# 336x1008 pixels, given as rows x columns of 336 px tiles (the same grids
# under the tiny stand-in switch). An image becomes up to 2,928 tokens (base
# tile 576 + un-padded 48x48 grid with newlines): stage 3 gets LLaVA-NeXT's
# 4096-token limit (stage 2 has 8192). The final model is also written as
# LlavaNextForConditionalGeneration. See docs/anyres.md.
#   tools/dist_train.sh configs/dpa_qwen2_5_7b_anyres.py 8
_base_ = ['dpa_qwen2_5_7b.py']
pad_to_square = False
anyres = dict(grid_shapes=[[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]])
finetune = dict(max_length=4096)
