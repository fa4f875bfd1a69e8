# configs/dpa_qwen2_5_7b.py with ShareGPT4V-PT captions for stages 1-2.
# FSDP2 (float32 master weights sharded over the GPUs): stage 3's 7B LLM with
# float32 weights, gradients and AdamW states does not fit an unsharded DDP
# replica on 80 GB (tools/plan_memory.py, docs/distributed.md).
_base_ = [
    '_base_/models/qwen2_5_7b_instruct.py', '_base_/models/clip_vit_l14_336.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/sharegpt4v_pt.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py', '_base_/strategies/fsdp.py'
]
model = dict(gradient_checkpointing=True)
