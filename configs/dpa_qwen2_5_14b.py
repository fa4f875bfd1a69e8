# The Qwen2.5 scale series: DPA on Qwen2.5-14B-Instruct, otherwise as
# configs/dpa_qwen2_5_7b.py.
# FSDP2 (float32 master weights sharded over the GPUs): stage 3's 14B LLM with
# float32 weights, gradients and AdamW states does not fit an unsharded DDP
# replica on 80 GB (tools/plan_memory.py, docs/distributed.md).
_base_ = [
    '_base_/models/qwen2_5_14b_instruct.py', '_base_/models/clip_vit_l14_336.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py', '_base_/strategies/fsdp.py'
]
model = dict(gradient_checkpointing=True)
# Memory knob for 8 x 80 GB (tools/plan_memory.py; the global batch holds
# through gradient accumulation): stage 1's packed 8192-token rows.
proxy = dict(batch_size=8)
