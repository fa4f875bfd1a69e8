"""Stage 1 and the stage-3 sampler: padded vs packed caption batches, and the
padding left by random vs modality-and-length-grouped batches."""
import sys
from typing import List

import torch

from dpa.datasets.llava import dpa_collate
from dpa.datasets.packing import packed_collate
from dpa.datasets.samplers import ModalityLengthGroupedSampler
from dpa.models import LlavaDPAModel
from .timing import interleaved_steps
from .training import FIRST_TEXT_ID, IMAGE_TOKENS, build_model, make_optimizer, step_fn, with_ratios


def caption_samples(args, vocab: int) -> List[dict]:
    """Stage-1 rows: captions of uniformly drawn lengths (short, as BLIP-LCS's)."""
    generator = torch.Generator().manual_seed(0)
    low, high = args.caption_tokens
    samples = []
    for _ in range(args.caption_batch_size):
        n = int(torch.randint(low, high + 1, (1, ), generator=generator))
        ids = torch.randint(FIRST_TEXT_ID, vocab, (n, ), generator=generator)
        samples.append(dict(input_ids=ids, labels=ids.clone(), pixel_values=None))
    return samples


def run_packing(args) -> List[dict]:
    """Stage 1 (LoRA, vanilla loss on caption text): padded vs packed batches."""
    records = []
    for vocab in args.vocab_sizes:
        model = build_model(args, vocab, ('lora', ), with_vision=False, lora_rank=args.lora_rank)
        optim = make_optimizer(model)
        samples = caption_samples(args, vocab)
        real_tokens = sum(len(s['input_ids']) for s in samples)
        batches = {name: {k: v.to(args.device) for k, v in collate(samples).items()
                          if v is not None}
                   for name, collate in (('padded', dpa_collate), ('packed', packed_collate))}
        steps = {name: step_fn(model, optim, batch, LlavaDPAModel.__call__)
                 for name, batch in batches.items()}
        results = interleaved_steps(steps, dict.fromkeys(steps, args.steps), args.warmup,
                                    args.device)
        for name, result in results.items():
            rows, length = batches[name]['input_ids'].shape
            result.update(tokens_per_step=real_tokens, rows=rows, row_length=length,
                          padding_fraction=1 - real_tokens / (rows * length))
        for name, result in with_ratios(results, 'padded').items():
            records.append(dict(vocab_size=vocab, shape='blip_lcs', stage='proxy', variant=name,
                                batch_size=args.caption_batch_size, **result))
            print(f'  {records[-1]}', file=sys.stderr, flush=True)
        del model, optim
    return records


class InstructRows:
    """LLaVA-665k-like rows for the sampler: 30% text-only, long-tailed lengths."""

    def __init__(self, n: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        words = torch.exp(5.0 + 0.8 * torch.randn(n, generator=generator)).clamp(8, 1500)
        text_only = torch.rand(n, generator=generator) < 0.3
        self.rows = []
        for count, no_image in zip(words.long().tolist(), text_only.tolist()):
            row = {'conversations': [{'from': 'gpt', 'value': 'w ' * count}]}
            if not no_image:
                row['image'] = 'image.jpg'
            self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def get_data_info(self, index):
        return dict(row=self.rows[index])


def run_sampler(args) -> List[dict]:
    sampler = ModalityLengthGroupedSampler(InstructRows(args.sampler_rows),
                                           batch_size=args.sampler_batch_size,
                                           image_length=IMAGE_TOKENS, seed=0)
    report = sampler.padding_report()
    return [dict(shape='instruct', stage='finetune', variant='group_by_modality_length',
                 batch_size=args.sampler_batch_size, rows=args.sampler_rows,
                 padding_random=report['random'], padding_grouped=report['grouped'],
                 median_step_s=None, ratio_to_vanilla=None, peak_mem_mb=None)]
