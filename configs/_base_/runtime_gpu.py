# The runtime of every real-model config: the default runtime, bf16 mixed
# precision (GPUs), and where checkpoints and datasets live on this machine.
# Model and dataset bases build their paths from the two roots; override them
# once for a whole config, e.g.
#   --cfg-options checkpoint_root=/ckpt data_root=/datasets
# or one path, e.g. --cfg-options llm_path=/ckpt/my-llm vision_path=/ckpt/my-clip
_base_ = ['default_runtime.py']
mixed_precision = 'bfloat16'
checkpoint_root = 'checkpoints'
data_root = 'data'
