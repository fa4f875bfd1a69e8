# DPA on Llama-3.1-8B-Instruct + CLIP ViT-L/14-336: BLIP-LCS-558K captions for
# stages 1-2, Cambrian-737K instructions for stage 3, global batch 256.
#   tools/dist_train.sh configs/dpa_llama3_1_8b.py 8
_base_ = [
    '_base_/models/llama3_1_8b_instruct.py', '_base_/models/clip_vit_l14_336.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py'
]
model = dict(gradient_checkpointing=True)
