# The Qwen2.5 scale series: DPA on Qwen2.5-32B-Instruct, otherwise as
# configs/dpa_qwen2_5_7b.py.
# 32B bf16 weights alone nearly fill an 80 GB GPU: FSDP2 shards them too, and
# gathers the stage artifacts to rank 0's CPU.
# FSDP2 (float32 master weights sharded over the GPUs): stage 3's 32B LLM with
# float32 weights, gradients and AdamW states does not fit an unsharded DDP
# replica on 80 GB (tools/plan_memory.py, docs/distributed.md).
_base_ = [
    '_base_/models/qwen2_5_32b_instruct.py', '_base_/models/clip_vit_l14_336.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py', '_base_/strategies/fsdp.py'
]
model = dict(gradient_checkpointing=True)
# Memory knobs for 8 x 80 GB (tools/plan_memory.py; the global batch holds
# through gradient accumulation): float32 master weights, gradients and AdamW
# states of 32B take ~65 GB per GPU of 8 in stage 3.
proxy = dict(batch_size=4)
finetune = dict(batch_size=1)
