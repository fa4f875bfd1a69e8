"""The benchmark behind ``tools/benchmark.py``: training-step variants
(``training``), stage-1 packing and the stage-3 sampler (``stage1``), timing
and memory (``timing``), the tables (``report``) and the command line (``cli``)."""
