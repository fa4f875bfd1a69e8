default_scope = 'dpa'
seed = 0
randomness = dict(seed=seed, deterministic=False)
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # `interval` is set per stage by its recipe's `checkpoint_interval`.
    checkpoint=dict(type='CheckpointHook', by_epoch=False, max_keep_ckpts=2, save_last=True),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
log_processor = dict(by_epoch=False, window_size=10)
log_level = 'INFO'
visualizer = dict(type='Visualizer', vis_backends=[
    dict(type='LocalVisBackend'),  # its scalars.json becomes each stage's curves.png
    # TensorBoard (`pip install tensorboard`): the scalars and, in CMO/CAL
    # stages, the histogram of the token weights. Uncomment the next line.
    # dict(type='TensorboardVisBackend'),
])
launcher = 'none'
# Bad data rows are skipped (and listed in <stage>/skipped_samples.jsonl) until
# they make up this share of a dataset; then the stage stops.
max_bad_fraction = 0.01
# A non-finite loss stops the stage (naming the last good checkpoint); True
# skips such steps instead, counting them in the log.
skip_nonfinite_steps = False
