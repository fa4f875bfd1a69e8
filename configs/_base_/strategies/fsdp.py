# PyTorch FSDP2 (torch.distributed.fsdp.fully_shard, dpa/engine/fsdp.py):
# parameters, gradients and optimizer states sharded across processes, one
# unit per decoder layer plus the root; float32 master weights
# (`trainable_dtype`), bf16 compute when `mixed_precision='bfloat16'`. The
# stage artifacts are gathered to rank 0's CPU; checkpoints are sharded
# (iter_N.dcp/ beside iter_N.pth). Runs on CPU with gloo too (the tests); in
# one process (no launcher) a stage trains unsharded.
strategy = dict(
    type='FSDP2Strategy',
    # Free each layer's gathered weights after its forward (ZeRO-3 memory);
    # False keeps them until the backward (ZeRO-2-like, more memory, less traffic).
    reshard_after_forward=True)
