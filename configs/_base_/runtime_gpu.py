# The runtime of every real-model config: the default runtime, bf16 mixed
# precision (GPUs), and where checkpoints and datasets live on this machine.
# Model and dataset bases build their paths from the two roots; override them
# once for a whole config, e.g.
#   --cfg-options checkpoint_root=/ckpt data_root=/datasets
# or one path, e.g. --cfg-options llm_path=/ckpt/my-llm vision_path=/ckpt/my-clip
_base_ = ['default_runtime.py']
mixed_precision = 'bfloat16'
# Whatever a stage trains is held in float32 (master weights) and computed in
# bf16 (autocast under DDP, MixedPrecisionPolicy under FSDP2); frozen weights
# stay in the dtype they are loaded in (`llm.torch_dtype='bfloat16'`). An
# optimizer stepping bf16 weights loses ~43% of the updates at lr 4e-5
# (dpa/engine/precision.py): the config check refuses it unless
# `allow_bf16_weights=True`.
trainable_dtype = 'float32'
checkpoint_root = 'checkpoints'
data_root = 'data'
