# The default: one model replica per process (DDP when launched with
# tools/dist_train.sh or tools/slurm_train.sh, a single process otherwise).
# Stages 1 and 2 train LoRA / the projector in float32 under bf16 autocast;
# stage 3 trains the LLM in the dtype it is loaded in (`llm.torch_dtype`), so
# bfloat16 weights get pure-bf16 updates: a DeepSpeed strategy keeps float32
# master weights.
strategy = None
