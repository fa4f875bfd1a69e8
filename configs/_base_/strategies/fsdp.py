# PyTorch FSDP through mmengine's FlexibleRunner: parameters, gradients and
# optimizer states sharded in units of at least 10M parameters; mixed precision is
# filled in by the pipeline (dpa/engine/distributed.py). FSDP needs a GPU.
# Known gap: the stage artifacts are written from rank 0's parameters, which
# FSDP shards; see docs/distributed.md.
strategy = dict(
    type='FSDPStrategy',
    model_wrapper=dict(
        auto_wrap_policy=dict(
            type='torch.distributed.fsdp.wrap.size_based_auto_wrap_policy',
            min_num_params=10000000),
        use_orig_params=True),
    state_dict_cfg='full')
