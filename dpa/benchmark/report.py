"""The benchmark's records as markdown tables."""
from typing import List

import torch


def threads(n: int) -> str:
    return f'{n} thread' + ('s' if n > 1 else '')


def step_rows(records: List[dict]) -> List[str]:
    """The table of the training-step records (align and finetune)."""
    lines = ['| vocab | shape | stage | variant | step (s) | x vanilla | peak mem (MB) '
             '| x vanilla | tokens/s |',
             '|---|---|---|---|---:|---:|---:|---:|---:|']
    for r in records:
        if r['stage'] in ('align', 'finetune') and r['median_step_s'] is not None:
            lines.append(f"| {r['vocab_size']} | {r['shape']} | {r['stage']} | {r['variant']} | "
                         f"{r['median_step_s']:.3f} | {r['ratio_to_vanilla']:.2f} | "
                         f"{r['peak_mem_mb']:.0f} | {r['mem_ratio_to_vanilla']:.2f} | "
                         f"{r['tokens_per_s']:.0f} |")
    return lines


def markdown(records: List[dict], args) -> str:
    lines = [f'LLM: random Qwen2, hidden {args.hidden_size}, {args.layers} layers, '
             f'intermediate {args.intermediate_size}, {args.heads} heads / {args.kv_heads} kv; '
             f'{args.dtype} on {args.device}, {threads(torch.get_num_threads())}; batch '
             f'{args.batch_size}; loss chunk {args.chunk_size}; median of {args.steps} steps '
             f'({args.reference_steps} for cmo_reference) after {args.warmup} warm-up '
             f'step(s) and a round measuring memory; {args.clock} clock.',
             '']
    lines += step_rows(records)
    packing = [r for r in records if r['stage'] == 'proxy']
    if packing:
        lines += ['', f'Stage 1 (LoRA r={args.lora_rank}): {args.caption_batch_size} captions '
                  f'of {args.caption_tokens[0]}-{args.caption_tokens[1]} tokens per batch.', '',
                  '| vocab | batch | rows x length | padding | step (s) | tokens/s | x padded |',
                  '|---|---|---|---:|---:|---:|---:|']
        for r in packing:
            lines.append(f"| {r['vocab_size']} | {r['variant']} | {r['rows']} x "
                         f"{r['row_length']} | {r['padding_fraction']:.1%} | "
                         f"{r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{1 / r['ratio_to_vanilla']:.2f} |")
    for r in records:
        if r['variant'] == 'group_by_modality_length':
            lines += ['', f"Stage 3 sampler ({r['rows']} LLaVA-665k-like rows, 30% text-only, "
                      f"batch {r['batch_size']}): padding {r['padding_random']:.1%} in random "
                      f"batches, {r['padding_grouped']:.1%} grouped by modality and length."]
    return '\n'.join(lines)


def model_line(args) -> str:
    return (f'LLM: random Qwen2, hidden {args.hidden_size}, {args.layers} layers, '
            f'intermediate {args.intermediate_size}, {args.heads} heads / {args.kv_heads} kv; '
            f'{args.dtype} on {args.device}, {threads(torch.get_num_threads())}; batch '
            f'{args.batch_size}; loss chunk {args.chunk_size}')


def profile_markdown(records: List[dict], args) -> str:
    """One row per (vocab, shape, stage, variant): milliseconds per step in
    each part, and the step's excess over vanilla split by part."""
    from .profile import PARTS
    columns = [column for column, _, _ in PARTS] + ['other']
    lines = [model_line(args) + f'; mean of {args.steps} profiled steps after '
             f'{args.warmup} warm-up step(s) per variant.', '',
             '| vocab | shape | stage | variant | step (ms) | x vanilla | '
             + ' | '.join(columns) + ' |',
             '|---|---|---|---|---:|---:|' + '---:|' * len(columns)]
    vanilla = {(r['vocab_size'], r['shape'], r['stage']): r['parts_ms']
               for r in records if r['variant'] == 'vanilla'}
    for r in records:
        parts, base = r['parts_ms'], vanilla.get((r['vocab_size'], r['shape'], r['stage']))
        ratio = f"{parts['step'] / base['step']:.3f}" if base else '-'
        lines.append(f"| {r['vocab_size']} | {r['shape']} | {r['stage']} | {r['variant']} | "
                     f"{parts['step']:.0f} | {ratio} | "
                     + ' | '.join(f'{parts[c]:.0f}' for c in columns) + ' |')
    return '\n'.join(lines)
