"""Step time and peak memory of DPA training: vanilla CE, CAL and CMO as this
toolkit computes them, beside CMO computed the reference implementation's way.

    python tools/benchmark.py                      # the default run (CPU, < 10 minutes)
    python tools/benchmark.py --json bench.json    # also write the records as JSON
    python tools/benchmark.py --device cuda --dtype bfloat16 --hidden-size 896 \\
        --intermediate-size 4864 --layers 24 --heads 14 --kv-heads 2 --batch-size 8

Every variant runs one optimizer step (forward, backward, AdamW update) of the
project's ``LlavaDPAModel`` on the same batch, in the same process, the
variants taking turns so that warm-up effects and the drifts of a shared
machine fall on all of them alike. After ``--warmup`` vanilla steps, one round
measures the peak memory of a step (process RSS high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on a GPU) and ``--steps`` rounds are
timed. Reported per (shape, stage, variant): the median step time and its
ratio to vanilla, the peak memory and its ratio, and the tokens per second
(real tokens, padding not counted). Variants:

- ``vanilla``: mean CE (the chunked loss: LM head on the supervised positions);
- ``cal``, ``cmo``: CAL and CMO (ours: no-image pass without the image tokens,
  target-token scores only, chunked);
- ``cmo_reference``: fnlp-vision/DPA's way, restated here: a masked full-length
  second pass, full-vocabulary float32 logits, a clone and two softmaxes. It
  costs many times the others: ``--reference-steps`` (default 1) are timed;
- ``vanilla_full_logits`` (only with ``--variants``): mean CE on the LLM's own
  full logits (``model.loss_chunk_size=None``), what the chunked loss saves.

Shapes follow the paper's data: ``blip_lcs`` (576 image tokens + ~48 caption
tokens), ``sharegpt4v`` (576 + ~256) and ``instruct`` (576 + ~512, prompt a
quarter of the text, 30% of the samples text-only: as stage 3's sampler groups
them, a finetune step is an image batch 70% of the time and a text-only batch
30%, and the instruct figures are that weighted mean; with the LLM frozen a
text-only sample trains nothing, so align steps are image batches). Stages:
``align`` (LLM frozen, projector trained) and ``finetune`` (LLM and projector
trained). Two more tables: stage-1 packing (padded vs packed caption batches) and the stage-3
sampler's padding fraction (random vs grouped by modality and length).
"""
import argparse
import ctypes
import json
import os
import os.path as osp
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from mmengine.optim import OptimWrapper

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import dpa  # noqa: E402,F401
from dpa.datasets.llava import dpa_collate  # noqa: E402
from dpa.datasets.packing import packed_collate  # noqa: E402
from dpa.datasets.samplers import ModalityLengthGroupedSampler  # noqa: E402
from dpa.models import LlavaDPAModel, VisualRelevanceLoss  # noqa: E402
from dpa.models.losses import IGNORE_INDEX  # noqa: E402

IMAGE_TOKEN_ID = 3  # '<image>' of TinyTokenizer
FIRST_TEXT_ID = 5
IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches
VARIANTS = ('vanilla', 'cal', 'cmo', 'cmo_reference', 'vanilla_full_logits')
DEFAULT_VARIANTS = VARIANTS[:4]
LOSS_MODES = dict(vanilla='vanilla', cal='cal', cmo='cmo', cmo_reference='cmo',
                  vanilla_full_logits='vanilla')


@dataclass
class Shape:
    """Samples of one kind of training data.

    Args:
        text_tokens: mean text tokens of a sample (rows of a batch spread over
            +-25% around it).
        text_only: share of the samples without an image.
        prompt: share of the text that is prompt (not supervised).
    """
    text_tokens: int
    text_only: float = 0.0
    prompt: float = 0.0


SHAPES = dict(blip_lcs=Shape(48), sharegpt4v=Shape(256),
              instruct=Shape(512, text_only=0.3, prompt=0.25))


# ---------------------------------------------------------------- memory and time
def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing every large
    block back to the kernel, as a GPU's caching allocator does: CPU steps then
    time the computation, not the kernel zeroing fresh pages (which costs more
    than the arithmetic in a virtual machine)."""
    libc = ctypes.CDLL('libc.so.6')
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def reset_peak(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    # Hand the kept memory back, then restart the high-water mark from here.
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def peak_mb(device: str) -> float:
    if device == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**20
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


def interleaved_steps(steps: Dict[str, Callable[[], None]], timed: Dict[str, int],
                      warmup: int, device: str) -> Dict[str, dict]:
    """Median step time and peak memory of each step function.

    ``warmup`` steps of the first function create the optimizer's state (the
    functions share the optimizer), so that it is in every peak measured by
    the next round; then the functions take turns, one step each per round,
    so that warm-up effects and the drifts of a shared machine fall on all of
    them alike: a round measuring each step's peak memory, then timed rounds.

    Args:
        steps: name -> one optimizer step.
        timed: name -> how many of its steps are timed.
        warmup: steps of the first function before measuring, at least 1.
    """
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    for _ in range(max(warmup, 1)):
        next(iter(steps.values()))()
    times = {name: [] for name in steps}
    peaks = {}
    for round_index in range(1 + max(timed.values())):
        for name, step in steps.items():
            if round_index > timed[name]:
                continue
            if round_index == 0:
                reset_peak(device)
            start = time.perf_counter()
            step()
            sync()
            if round_index == 0:
                peaks[name] = peak_mb(device)
            else:
                times[name].append(time.perf_counter() - start)
    return {name: dict(median_step_s=statistics.median(times[name]), peak_mem_mb=peaks[name])
            for name in steps}


# ---------------------------------------------------------------- model and data
def build_model(args, vocab_size: int, trainable, with_vision=True, lora_rank=None):
    llm = dict(type='HFCausalLM', torch_dtype=args.dtype,
               config=dict(model_type='qwen2', vocab_size=vocab_size,
                           hidden_size=args.hidden_size,
                           intermediate_size=args.intermediate_size,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                           tie_word_embeddings=False))
    if lora_rank:
        llm = dict(type='ProxyLLMWrapper', llm=llm,
                   lora=dict(r=lora_rank, lora_alpha=2 * lora_rank, target_modules='all-linear'))
    # A small CLIP with LLaVA-1.5's 576 image tokens: the vision tower is frozen
    # and costs every variant the same.
    vision = None if not with_vision else dict(
        type='HFVisionTower', torch_dtype=args.dtype, feature_layer=-2,
        config=dict(model_type='clip_vision_model', hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=2, image_size=96, patch_size=4))
    model = LlavaDPAModel(llm=llm, tokenizer=dict(type='TinyTokenizer'), vision_tower=vision,
                          trainable=trainable, loss_chunk_size=args.chunk_size)
    return model.to(args.device).train()


def make_batch(shape: Shape, batch_size: int, vocab_size: int, with_image: bool, args) -> dict:
    """A right-padded batch of ``<bos>`` (+ 576 image tokens) + text, labels on
    the text after its prompt share."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for row in range(batch_size):
        spread = 0.75 + 0.5 * row / max(batch_size - 1, 1)
        n_text = max(2, round(shape.text_tokens * spread))
        text = torch.randint(FIRST_TEXT_ID, vocab_size, (n_text, ), generator=generator)
        prefix = torch.tensor([1] + [IMAGE_TOKEN_ID] * (IMAGE_TOKENS if with_image else 0))
        labels = text.clone()
        labels[:int(shape.prompt * n_text)] = IGNORE_INDEX
        samples.append(dict(
            input_ids=torch.cat([prefix, text]),
            labels=torch.cat([torch.full_like(prefix, IGNORE_INDEX), labels]),
            pixel_values=torch.randn(3, 96, 96, generator=generator) if with_image else None))
    batch = dpa_collate(samples)
    dtype = getattr(torch, args.dtype)
    return {k: (v.to(args.device, dtype) if k == 'pixel_values' else v.to(args.device))
            for k, v in batch.items() if v is not None}


def shape_batches(shape: Shape, stage: str, vocab_size: int, args) -> List[Tuple[dict, float]]:
    """(batch, share of the steps) of a shape: image batches, and text-only
    batches for the share of text-only samples when the LLM trains (with the
    LLM frozen, a text-only sample trains nothing)."""
    text_only = shape.text_only if stage == 'finetune' else 0.0
    batches = [(make_batch(shape, args.batch_size, vocab_size, True, args), 1 - text_only)]
    if text_only:
        batches.append((make_batch(shape, args.batch_size, vocab_size, False, args), text_only))
    return batches


# ---------------------------------------------------------------- the reference's way
def reference_cmo_loss(model: LlavaDPAModel, input_ids, attention_mask, labels,
                       pixel_values=None, clamp=(0.05, 0.5)) -> dict:
    """CMO as fnlp-vision/DPA computes it (``llava_qwen_dpa.py``), restated
    for the benchmark: a full-length no-image pass with the image positions
    masked out, full-vocabulary float32 logits of both passes, a clone and two
    softmaxes, smoothing over the flattened batch."""
    embeds, image_mask = model.embed(input_ids, pixel_values)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        mask_without_image = attention_mask.clone()
        mask_without_image[image_mask] = 0
        logits_without_image = model.llm(inputs_embeds=embeds.clone().contiguous(),
                                         attention_mask=mask_without_image,
                                         position_ids=position_ids, use_cache=False).logits.float()
    logits = model.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False).logits.float()
    vocab = logits.shape[-1]
    shift_logits = logits[..., :-1, :].contiguous().view(-1, vocab)
    shift_labels = labels[..., 1:].contiguous().view(-1)
    with torch.no_grad():
        targets = shift_labels.clone()
        targets[targets == IGNORE_INDEX] = 0
        probs_image = torch.softmax(shift_logits.clone(), dim=-1)
        shift_without = logits_without_image[..., :-1, :].contiguous()
        del logits_without_image
        probs_text = torch.softmax(shift_without.reshape(-1, vocab), dim=-1)
        delta = (probs_image.gather(1, targets.unsqueeze(1))
                 - probs_text.gather(1, targets.unsqueeze(1))).clamp(*clamp)
        weights = F.avg_pool1d(delta[:, 0].view(1, 1, -1), 3, stride=1, padding=1,
                               count_include_pad=False)[0, 0]
        del probs_image, probs_text, shift_without
    loss = F.cross_entropy(shift_logits, shift_labels, reduction='none') * weights
    return {'loss': loss.sum() / (weights[shift_labels != IGNORE_INDEX].sum() + 1e-6)}


# ---------------------------------------------------------------- the runs
def step_fn(model, optim: OptimWrapper, batch: dict, loss: Callable) -> Callable[[], None]:
    """One optimizer step of ``model`` on ``batch`` with the loss ``loss(model, **batch)``."""

    def step():
        optim.update_params(loss(model, **batch)['loss'])
    return step


def variant_loss(variant: str, split_llm) -> Callable:
    """The loss of a variant, on the model the variants share."""
    loss_fn = VisualRelevanceLoss(mode=LOSS_MODES[variant])
    full_logits = variant in ('cmo_reference', 'vanilla_full_logits')

    def loss(model, **batch):
        model.loss_fn = loss_fn
        model.split_llm = None if full_logits else split_llm
        if variant == 'cmo_reference':
            return reference_cmo_loss(model, **batch)
        return model(**batch)
    return loss


def make_optimizer(model) -> OptimWrapper:
    params = [p for p in model.parameters() if p.requires_grad]
    return OptimWrapper(torch.optim.AdamW(params, lr=1e-6))


def with_ratios(results: Dict[str, dict], base: str) -> Dict[str, dict]:
    for result in results.values():
        result['ratio_to_vanilla'] = result['median_step_s'] / results[base]['median_step_s']
        result['mem_ratio_to_vanilla'] = result['peak_mem_mb'] / results[base]['peak_mem_mb']
        result['tokens_per_s'] = result['tokens_per_step'] / result['median_step_s']
    return results


def run_training_variants(args) -> List[dict]:
    records = []
    for vocab in args.vocab_sizes:
        for stage in args.stages:
            trainable = ('projector', ) if stage == 'align' else ('llm', 'projector')
            model = build_model(args, vocab, trainable)
            optim = make_optimizer(model)
            losses = {variant: variant_loss(variant, model.split_llm) for variant in args.variants}
            for shape_name in args.shapes:
                batches = shape_batches(SHAPES[shape_name], stage, vocab, args)
                steps, timed = {}, {}
                for variant, loss in losses.items():
                    for index, (batch, _) in enumerate(batches):
                        steps[variant, index] = step_fn(model, optim, batch, loss)
                        timed[variant, index] = (args.reference_steps
                                                 if variant == 'cmo_reference' else args.steps)
                measured = interleaved_steps(steps, timed, args.warmup, args.device)
                results = {}
                for variant in losses:
                    # A step of this shape: its batches weighted by their share.
                    parts = [(measured[variant, i], share, int(batch['attention_mask'].sum()))
                             for i, (batch, share) in enumerate(batches)]
                    results[variant] = dict(
                        median_step_s=sum(m['median_step_s'] * share for m, share, _ in parts),
                        peak_mem_mb=max(m['peak_mem_mb'] for m, _, _ in parts),
                        tokens_per_step=sum(tokens * share for _, share, tokens in parts))
                for variant, result in with_ratios(results, 'vanilla').items():
                    records.append(dict(vocab_size=vocab, shape=shape_name, stage=stage,
                                        variant=variant, batch_size=args.batch_size, **result))
                    print(f'  {records[-1]}', file=sys.stderr, flush=True)
            del model, optim
    return records


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


# ---------------------------------------------------------------- output
def threads(n: int) -> str:
    return f'{n} thread' + ('s' if n > 1 else '')


def markdown(records: List[dict], args) -> str:
    lines = [f'LLM: random Qwen2, hidden {args.hidden_size}, {args.layers} layers, '
             f'intermediate {args.intermediate_size}, {args.heads} heads / {args.kv_heads} kv; '
             f'{args.dtype} on {args.device}, {threads(torch.get_num_threads())}; batch '
             f'{args.batch_size}; loss chunk {args.chunk_size}; median of {args.steps} steps '
             f'({args.reference_steps} for cmo_reference) after {args.warmup} warm-up '
             'step(s) and a round measuring memory.',
             '',
             '| vocab | shape | stage | variant | step (s) | x vanilla | peak mem (MB) '
             '| x vanilla | tokens/s |',
             '|---|---|---|---|---:|---:|---:|---:|---:|']
    for r in records:
        if r['stage'] in ('align', 'finetune') and r['median_step_s'] is not None:
            lines.append(f"| {r['vocab_size']} | {r['shape']} | {r['stage']} | {r['variant']} | "
                         f"{r['median_step_s']:.3f} | {r['ratio_to_vanilla']:.2f} | "
                         f"{r['peak_mem_mb']:.0f} | {r['mem_ratio_to_vanilla']:.2f} | "
                         f"{r['tokens_per_s']:.0f} |")
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


DTYPES = ('float32', 'bfloat16', 'float16', 'float64')


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value} is not at least 1')
    return value


def vocab_size(text: str) -> int:
    """argparse type: a vocabulary with room for the tiny tokenizer's special ids."""
    value = positive_int(text)
    if value <= FIRST_TEXT_ID:
        raise argparse.ArgumentTypeError(f'{value}: the vocabulary needs more than '
                                         f'{FIRST_TEXT_ID} ids (special tokens come first)')
    return value


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """What the model configs and the run need, refused before anything runs."""
    if args.hidden_size % args.heads:
        parser.error(f'--hidden-size {args.hidden_size} is not a multiple of --heads '
                     f'{args.heads}')
    if args.heads % args.kv_heads:
        parser.error(f'--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}')
    if (args.hidden_size // args.heads) % 2:
        parser.error(f'--hidden-size / --heads = {args.hidden_size // args.heads}: rotary '
                     'embeddings need an even head size')
    low, high = args.caption_tokens
    if low > high:
        parser.error(f'--caption-tokens {low} {high}: the first is the minimum')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: no GPU is visible')
    if args.device != 'cpu' and not args.device.startswith('cuda'):
        parser.error(f'--device {args.device}: use cpu or cuda[:N]')
    if args.json:
        folder = osp.dirname(osp.abspath(args.json))
        if not osp.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f'--json {args.json}: the folder {folder} does not exist or is not '
                         'writable (checked now, not after the run)')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Benchmark DPA training steps')
    parser.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--stages', nargs='+', default=['align', 'finetune'],
                        choices=['align', 'finetune'])
    parser.add_argument('--variants', nargs='+', default=list(DEFAULT_VARIANTS),
                        choices=VARIANTS, help='vanilla, the baseline of the ratios, always runs')
    parser.add_argument('--vocab-sizes', nargs='+', type=vocab_size, default=[32000, 151936])
    parser.add_argument('--hidden-size', type=positive_int, default=256)
    parser.add_argument('--intermediate-size', type=positive_int, default=704)
    parser.add_argument('--layers', type=positive_int, default=2)
    parser.add_argument('--heads', type=positive_int, default=4)
    parser.add_argument('--kv-heads', type=positive_int, default=2)
    parser.add_argument('--batch-size', type=positive_int, default=1)
    parser.add_argument('--chunk-size', type=positive_int, default=512,
                        help='model.loss_chunk_size')
    parser.add_argument('--warmup', type=positive_int, default=1,
                        help='vanilla steps before measuring (at least 1); a round measuring '
                        'the peak memory follows, then the timed rounds')
    parser.add_argument('--steps', type=positive_int, default=4, help='timed steps per variant')
    parser.add_argument('--reference-steps', type=positive_int, default=1,
                        help='timed steps of cmo_reference')
    parser.add_argument('--threads', type=positive_int, default=1,
                        help="torch's CPU threads; 1 keeps timings steady on a machine that "
                        'other jobs share')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=DTYPES)
    parser.add_argument('--caption-batch-size', type=positive_int, default=16)
    parser.add_argument('--caption-tokens', nargs=2, type=positive_int, default=[8, 48])
    parser.add_argument('--lora-rank', type=positive_int, default=16)
    parser.add_argument('--sampler-rows', type=positive_int, default=20000)
    parser.add_argument('--sampler-batch-size', type=positive_int, default=16)
    parser.add_argument('--no-packing', action='store_true', help='skip the stage-1 table')
    parser.add_argument('--json', help='also write the records to this JSON file')
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.variants = ['vanilla'] + [v for v in args.variants if v != 'vanilla']
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == 'cpu':
        keep_freed_memory()
    start = time.perf_counter()
    records = run_training_variants(args)
    if not args.no_packing:
        records += run_packing(args)
    records += run_sampler(args)
    device = torch.cuda.get_device_name() if args.device == 'cuda' else \
        f'CPU, {threads(torch.get_num_threads())}'
    for record in records:
        record.update(device=device, dtype=args.dtype)
    print(markdown(records, args))
    print(f'\n{time.perf_counter() - start:.0f} s; command: python tools/benchmark.py '
          + ' '.join(sys.argv[1:] if argv is None else argv))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(records, f, indent=1)


if __name__ == '__main__':
    main()
