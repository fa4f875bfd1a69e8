# The default: one model replica per process (DDP when launched with
# tools/dist_train.sh or tools/slurm_train.sh, a single process otherwise).
# With `trainable_dtype='float32'` (_base_/runtime_gpu.py) the trainable
# weights, their gradients and AdamW's two states are float32 on every GPU:
# 16 bytes per trained parameter, unsharded (tools/plan_memory.py).
strategy = None
