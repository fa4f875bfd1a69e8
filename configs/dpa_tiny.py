# The embedded default: all three DPA stages on a random tiny Qwen2 + CLIP and
# synthetic data, on a laptop CPU. Everything but sizes comes from the bases.
_base_ = [
    '_base_/models/tiny_qwen2.py', '_base_/models/tiny_clip.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/tiny_synthetic.py',
    '_base_/schedules/proxy.py', '_base_/schedules/align.py',
    '_base_/schedules/finetune.py', '_base_/default_runtime.py'
]
# The final model is scored on the synthetic evaluation split (a few seconds).
stages = ['proxy', 'align', 'finetune', 'eval']

proxy = dict(lora=dict(r=8, lora_alpha=16), max_length=128, batch_size=4, global_batch_size=8,
             checkpoint_interval=8)
align = dict(max_length=128, batch_size=4, global_batch_size=8, checkpoint_interval=8)
finetune = dict(max_length=256, batch_size=4, global_batch_size=8, checkpoint_interval=8)
default_hooks = dict(logger=dict(interval=4))
