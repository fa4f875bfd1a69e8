# DPA on Gemma-2-9B-it + CLIP ViT-L/14-336: BLIP-LCS-558K captions for stages
# 1-2, Cambrian-737K instructions for stage 3, global batch 256.
#   tools/dist_train.sh configs/dpa_gemma2_9b.py 8
# FSDP2 (float32 master weights sharded over the GPUs): stage 3's 9B LLM with
# float32 weights, gradients and AdamW states does not fit an unsharded DDP
# replica on 80 GB (tools/plan_memory.py, docs/distributed.md).
_base_ = [
    '_base_/models/gemma2_9b_it.py', '_base_/models/clip_vit_l14_336.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py', '_base_/strategies/fsdp.py'
]
model = dict(gradient_checkpointing=True)
# The schedule's 8192 (the reference's) exceeds Gemma-2's 4096-token sliding
# window, where the removed no-image pass stops matching the masked one.
align = dict(max_length=4096)
