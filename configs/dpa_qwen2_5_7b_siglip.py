# configs/dpa_qwen2_5_7b.py with a SigLIP so400m/14-384 vision tower.
_base_ = [
    '_base_/models/qwen2_5_7b_instruct.py', '_base_/models/siglip_so400m_p14_384.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/blip_lcs_558k.py',
    '_base_/datasets/cambrian_737k.py', '_base_/schedules/dpa.py',
    '_base_/runtime_gpu.py'
]
model = dict(gradient_checkpointing=True)
