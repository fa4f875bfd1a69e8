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
- ``cmo_all_text_scores`` (only with ``--variants``): CMO scoring the no-image
  pass for every target, the pass run whole before the image pass. ``cmo``
  skips the targets whose image probability is at most ``delta_min`` (their
  weight is ``delta_min`` whatever the text pass says): it runs the pass after
  the image scores, on the rows holding a target above the floor, each cut
  after its last one. In the benchmark's random models every target is at the
  floor, so ``cmo`` runs no pass at all: it is CMO's best case and this its
  worst (every target above the floor);
- ``hf_llava``: the peer, transformers' ``LlavaForConditionalGeneration`` made
  of the same modules and trained with its own loss (full logits, then
  ``ForCausalLMLoss``), what TRL-based LLaVA training runs;
- ``vanilla_full_logits`` (only with ``--variants``): mean CE on the LLM's own
  full logits (``model.loss_chunk_size=None``), what the chunked loss saves.

Shapes follow the paper's data: ``blip_lcs`` (576 image tokens + ~48 caption
tokens), ``sharegpt4v`` (576 + ~256) and ``instruct`` (576 + ~512, prompt a
quarter of the text, 30% of the samples text-only: as stage 3's sampler groups
them, a finetune step is an image batch 70% of the time and a text-only batch
30%, and the instruct figures are that weighted mean; with the LLM frozen a
text-only sample trains nothing, so align steps are image batches) and
``anyres`` (LLaVA-NeXT's dynamic resolution: a 2 x 2 grid of tiles plus the
base tile, 2,928 image tokens, + ~48 caption tokens). Stages:
``align`` (LLM frozen, projector trained) and ``finetune`` (LLM and projector
trained). Two more tables: stage-1 packing (padded vs packed caption batches) and the stage-3
sampler's padding fraction (random vs grouped by modality and length).
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

import torch

from dpa.engine.config_file import add_cfg_options, positive_int
from dpa.errors import ConfigError

from .config_run import config_markdown, run_config_variants
from .data_pipeline import data_pipeline_markdown, run_data_pipeline
from .profile import profile_variants
from .report import markdown, profile_markdown, threads
from .stage1 import run_packing, run_sampler
from .timing import keep_freed_memory
from .training import DEFAULT_VARIANTS, FIRST_TEXT_ID, SHAPES, VARIANTS, run_training_variants

DTYPES = ('float32', 'bfloat16', 'float16', 'float64')


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
    if args.clock == 'cpu' and args.device != 'cpu':
        parser.error('--clock cpu times CPU steps; a GPU step is timed by the wall clock')
    if args.device != 'cpu' and not args.device.startswith('cuda'):
        parser.error(f'--device {args.device}: use cpu or cuda[:N]')
    if args.config and (args.data_pipeline or args.profile):
        parser.error('--config times training steps: not with --data-pipeline or --profile')
    if args.real_weights and not args.config:
        parser.error('--real-weights needs --config')
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
    parser.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                        help="what a step's time is: elapsed (wall) or the process's CPU time "
                        '(cpu: on a CPU that other jobs share, what the step computed, not how '
                        'long it waited for a core; CPU only)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=DTYPES)
    parser.add_argument('--caption-batch-size', type=positive_int, default=16)
    parser.add_argument('--caption-tokens', nargs=2, type=positive_int, default=[8, 48])
    parser.add_argument('--lora-rank', type=positive_int, default=16)
    parser.add_argument('--sampler-rows', type=positive_int, default=20000)
    parser.add_argument('--sampler-batch-size', type=positive_int, default=16)
    parser.add_argument('--no-packing', action='store_true', help='skip the stage-1 table')
    parser.add_argument('--profile', action='store_true',
                        help='instead of timing steps, profile them (torch.profiler): where '
                        'the time of a step goes, per variant (see dpa/benchmark/profile.py)')
    parser.add_argument('--json', help='also write the records to this JSON file')
    parser.add_argument('--config', metavar='CONFIG',
                        help="time CONFIG's own model (random weights at its checkpoints' "
                        "shape) on its align and finetune batches instead of a synthetic "
                        'shape; the LLM and shape flags are then not used (see '
                        'dpa/benchmark/config_run.py); with --stages, --variants, --steps, '
                        '--real-weights, --cfg-options')
    parser.add_argument('--real-weights', action='store_true',
                        help="with --config: load the config's checkpoints instead of random "
                        'weights (CMO then scores what a pretrained model scores)')
    parser.add_argument('--data-pipeline', metavar='CONFIG',
                        help="instead of training steps, the loader throughput of CONFIG's "
                        'stages per worker count beside an estimated GPU step time (see '
                        'dpa/benchmark/data_pipeline.py); with --workers, --batches, '
                        '--real-images, --cfg-options')
    parser.add_argument('--workers', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--batches', type=positive_int, default=8,
                        help='timed batches per worker count')
    parser.add_argument('--real-images', action='store_true',
                        help='with tiny_standin=True: real-size JPEGs and the real '
                        "vision tower's image processor")
    add_cfg_options(parser)
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
    if args.data_pipeline:
        records = run_data_pipeline(args.data_pipeline, args.cfg_options, workers=args.workers,
                                    batches=args.batches, real_images=args.real_images)
        print(data_pipeline_markdown(records))
        finish(records, args, argv, start)
        return
    if args.config:
        try:
            records = run_config_variants(args)
        except ConfigError as err:
            sys.exit(f'tools/benchmark.py --config {args.config}: cannot benchmark it: {err}')
        print(config_markdown(records, args))
        finish(records, args, argv, start)
        return
    if args.profile:
        records = profile_variants(args)
        print(profile_markdown(records, args))
        finish(records, args, argv, start)
        return
    records = run_training_variants(args)
    if not args.no_packing:
        records += run_packing(args)
    records += run_sampler(args)
    print(markdown(records, args))
    finish(records, args, argv, start)


def finish(records, args, argv, start: float) -> None:
    """Label the records with the device, print the time and the command,
    write the JSON."""
    device = torch.cuda.get_device_name() if args.device == 'cuda' else \
        f'CPU, {threads(torch.get_num_threads())}'
    for record in records:
        record.update(device=device)
        record.setdefault('dtype', args.dtype)  # --config: the config's
    print(f'\n{time.perf_counter() - start:.0f} s; command: python tools/benchmark.py '
          + ' '.join(sys.argv[1:] if argv is None else argv))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(records, f, indent=1)
