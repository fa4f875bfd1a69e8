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
# Data loading beside the GPU step, as the reference's --dataloader_num_workers 4:
# decoding, padding to a square and the image processor run in 4 worker
# processes per GPU, batches are pinned for the copy to the GPU and the workers
# live through the stage. One stage's count: --cfg-options align.num_workers=8.
# tools/benchmark.py --data-pipeline CONFIG measures what a count delivers
# (docs/benchmarks.md); dpa/engine/dataloader.py.
dataloader = dict(num_workers=4, pin_memory=True, persistent_workers=True, prefetch_factor=2)
# float32 matmuls on TF32 tensor cores on a CUDA device (the reference's --tf32 True).
tf32 = True
# The reference's --torch_compile True: True (or torch.compile's keyword
# arguments) compiles each decoder layer of the LLM with inductor
# (dpa/engine/compile.py). Off by default: the first steps of each stage and
# each new sequence length pay the compilation.
compile = False
