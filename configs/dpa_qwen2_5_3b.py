# The Qwen2.5 scale series: DPA on Qwen2.5-3B-Instruct, otherwise as
# configs/dpa_qwen2_5_7b.py.
_base_ = [
    '_base_/models/qwen2_5_3b_instruct.py', '_base_/models/clip_vit_l14_336.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py'
]
model = dict(gradient_checkpointing=True)
