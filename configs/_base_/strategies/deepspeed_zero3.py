# DeepSpeed ZeRO-3 through mmengine's FlexibleRunner (`pip install deepspeed`):
# parameters too are sharded, for LLMs whose bf16 weights do not fit one GPU
# next to their activations (Qwen2.5-32B). Accumulation, clipping and mixed
# precision are filled in by the pipeline (dpa/engine/distributed.py).
# Known gap: the stage artifacts are written from rank 0's parameters, which
# ZeRO-3 shards; see docs/distributed.md.
strategy = dict(
    type='DeepSpeedStrategy',
    zero_optimization=dict(
        stage=3,
        overlap_comm=True,
        contiguous_gradients=True,
        stage3_gather_16bit_weights_on_model_save=True),
    exclude_frozen_parameters=True)
