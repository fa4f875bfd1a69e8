# What both priors of the language-prior-conflict benchmark share
# (docs/prior_conflict.md): the recipe, the data layout and the toy prior LLM.
# `dpa.py` adds the toy run's random tiny CLIP, `smollm2/dpa.py` the real
# prior and DINOv2.
_base_ = [
    '../_base_/models/llava_mlp2x.py', '../_base_/schedules/dpa.py',
    '../_base_/default_runtime.py'
]
data_root = 'data'
benchmark_root = '{data_root}/prior_conflict'
llm = dict(type='HFCausalLM', pretrained='{benchmark_root}/prior_llm', torch_dtype='float32')
tokenizer = dict(type='HFTokenizer', pretrained='{benchmark_root}/prior_llm')
caption_data = dict(data_files=['{benchmark_root}/data/captions.jsonl'],
                    image_folder='{benchmark_root}/data/images')
instruct_data = dict(data_files=['{benchmark_root}/data/instructions.jsonl'],
                     image_folder='{benchmark_root}/data/images')
stages = ['proxy', 'align', 'finetune', 'eval']
eval = dict(data='{benchmark_root}/data/eval.jsonl', image_folder='{benchmark_root}/data/images',
            batch_size=64)

# Tiny models need these rates; the paper's 4e-5 does not move them.
_adamw = dict(type='OptimWrapper', clip_grad=dict(max_norm=1.0),
              optimizer=dict(type='AdamW', betas=(0.9, 0.999), weight_decay=0.0))
_sizes = dict(batch_size=16, global_batch_size=16, max_length=64, warmup_ratio=0.03,
              checkpoint_interval=100000, num_workers=0)
proxy = dict(lora=dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules='all-linear'),
             max_epochs=2, optim_wrapper=dict(_adamw, optimizer=dict(_adamw['optimizer'],
                                                                     lr=2e-3)), **_sizes)
# With 2 epochs the projector carried no content.
align = dict(max_epochs=8, optim_wrapper=dict(_adamw, optimizer=dict(_adamw['optimizer'],
                                                                     lr=5e-3)), **_sizes)
# With 3 epochs the ranking flipped on one of two seeds: 1 epoch.
finetune = dict(max_epochs=1, optim_wrapper=dict(_adamw, optimizer=dict(_adamw['optimizer'],
                                                                        lr=5e-4)), **_sizes)
default_hooks = dict(logger=dict(interval=50), checkpoint=dict(save_last=False))
