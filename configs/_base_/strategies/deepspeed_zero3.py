# DeepSpeed ZeRO-3 through mmengine's FlexibleRunner (`pip install deepspeed`):
# parameters too are sharded. Accumulation, clipping and mixed precision are
# filled in by the pipeline (dpa/engine/distributed.py).
# Refused by the config check: the stage artifacts would be written from rank
# 0's shards; the gather (deepspeed.zero.GatheredParameters) needs a GPU to be
# built and tested. Sharded parameters with gathered artifacts: fsdp.py.
strategy = dict(
    type='DeepSpeedStrategy',
    zero_optimization=dict(
        stage=3,
        overlap_comm=True,
        contiguous_gradients=True,
        stage3_gather_16bit_weights_on_model_save=True),
    exclude_frozen_parameters=True)
