# configs/dpa_qwen2_5_7b.py with a SigLIP so400m/14-384 vision tower.
# FSDP2 (float32 master weights sharded over the GPUs): stage 3's 7B LLM with
# float32 weights, gradients and AdamW states does not fit an unsharded DDP
# replica on 80 GB (tools/plan_memory.py, docs/distributed.md).
_base_ = [
    '_base_/models/qwen2_5_7b_instruct.py', '_base_/models/siglip_so400m_p14_384.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py', '_base_/strategies/fsdp.py'
]
model = dict(gradient_checkpointing=True)
