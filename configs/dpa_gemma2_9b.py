# DPA on Gemma-2-9B-it + CLIP ViT-L/14-336: BLIP-LCS-558K captions for stages
# 1-2, Cambrian-737K instructions for stage 3, global batch 256. ZeRO-2: a
# full DDP replica of a 9B LLM with its gradients and AdamW states does not
# fit an 80 GB GPU.
#   tools/dist_train.sh configs/dpa_gemma2_9b.py 8
_base_ = [
    '_base_/models/gemma2_9b_it.py', '_base_/models/clip_vit_l14_336.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py', '_base_/strategies/deepspeed_zero2.py'
]
model = dict(gradient_checkpointing=True)
