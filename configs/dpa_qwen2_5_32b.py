# The Qwen2.5 scale series: DPA on Qwen2.5-32B-Instruct, otherwise as
# configs/dpa_qwen2_5_7b.py.
# ZeRO-3: 32B bf16 weights alone nearly fill an 80 GB GPU. On GPUs the config
# check refuses ZeRO-3 until stage artifacts are gathered from sharded
# parameters (docs/distributed.md, 'Known gaps'); the stand-in runs on CPU.
_base_ = [
    '_base_/models/qwen2_5_32b_instruct.py', '_base_/models/clip_vit_l14_336.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py', '_base_/strategies/deepspeed_zero3.py'
]
model = dict(gradient_checkpointing=True)
