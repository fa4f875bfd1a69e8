# The embedded default under FSDP2 (sharded parameters), float32 on CPU:
#   tools/dist_train.sh configs/dpa_tiny_fsdp.py 2
# Its artifacts equal those of `tools/dist_train.sh configs/dpa_tiny.py 2` (DDP)
# within 1e-5 (tests/test_distributed.py).
_base_ = ['dpa_tiny.py', '_base_/strategies/fsdp.py']
