# DeepSpeed ZeRO-2 through mmengine's FlexibleRunner (`pip install deepspeed`):
# optimizer states and gradients sharded across processes, float32 master
# weights. The stage's gradient accumulation, clipping and mixed precision are
# filled in by the pipeline (dpa/engine/distributed.py).
strategy = dict(
    type='DeepSpeedStrategy',
    zero_optimization=dict(
        stage=2,
        overlap_comm=True,
        contiguous_gradients=True,
        reduce_bucket_size=500000000,
        allgather_bucket_size=500000000),
    exclude_frozen_parameters=True)
