# DPA on InternLM2-chat-7B + CLIP ViT-L/14-336: BLIP-LCS-558K captions for
# stages 1-2, Cambrian-737K instructions for stage 3, global batch 256 whatever
# the number of GPUs. One node of 8 GPUs:
#   tools/dist_train.sh configs/dpa_internlm7b.py 8
# Paths: --cfg-options checkpoint_root=/ckpt data_root=/datasets (docs/families.md).
# With the checkpoint's own code (llm.use_checkpoint_code=True) also set
# proxy.pack=False: that code ignores the position-id restarts that keep
# packed samples apart.
# FSDP2 (float32 master weights sharded over the GPUs): stage 3's 7B LLM with
# float32 weights, gradients and AdamW states does not fit an unsharded DDP
# replica on 80 GB (tools/plan_memory.py, docs/distributed.md).
_base_ = [
    '_base_/models/internlm2_chat_7b.py', '_base_/models/clip_vit_l14_336.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py', '_base_/strategies/fsdp.py'
]
model = dict(gradient_checkpointing=True)
