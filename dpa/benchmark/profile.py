"""Where a CMO step's time goes, beside a vanilla step's: ``tools/benchmark.py
--profile``.

The model marks its parts with ``torch.profiler.record_function`` regions
(``dpa.embed``, ``dpa.text_pass``, ``dpa.text_pass.forward``,
``dpa.image_pass.forward``, ``dpa.scores.image``, ``dpa.scores.text``,
``dpa.weights``); the step adds ``dpa.backward`` and ``dpa.optimizer``. The
variants take turns step by step under one profiler, as the timed benchmark
does, and each region's time is its mean per step. On a GPU the regions time
the host side only (kernels run asynchronously): read them on CPU, or use the
step times of the plain benchmark.
"""
import sys
from typing import Dict, List

from torch.profiler import ProfilerActivity, profile, record_function

from .training import (SHAPES, build_model, make_optimizer, shape_batches, stage_models,
                       variant_loss)

# (column, region, region subtracted from it)
PARTS = (
    ('vision + projector', 'dpa.embed', None),
    ('image pass fwd', 'dpa.image_pass.forward', None),
    ('text pass inputs', 'dpa.text_pass', 'dpa.text_pass.forward'),
    ('text pass fwd', 'dpa.text_pass.forward', None),
    ('scores (image)', 'dpa.scores.image', None),
    ('scores (text)', 'dpa.scores.text', None),
    ('weights', 'dpa.weights', None),
    ('backward', 'dpa.backward', None),
    ('optimizer', 'dpa.optimizer', None),
    ('peer fwd + loss', 'dpa.peer.forward', None),  # hf_llava: transformers' own forward
)


def profiled_step(model, optim, batch: dict, loss_fn):
    """One optimizer step with its forward, backward and update marked."""

    def step():
        with record_function('dpa.step'):
            with record_function('dpa.forward'):
                loss = loss_fn(model, **batch)['loss']
            with record_function('dpa.backward'):
                loss.backward()
            with record_function('dpa.optimizer'):
                optim.step()
                optim.zero_grad()
    return step


def region_ms(prof, steps: int) -> Dict[str, float]:
    """Mean milliseconds per step of every ``dpa.*`` region."""
    return {event.key: event.cpu_time_total / 1000 / steps
            for event in prof.key_averages() if event.key.startswith('dpa.')}


def split_step(regions: Dict[str, float]) -> Dict[str, float]:
    """The step's time in the columns of :data:`PARTS`, the rest as 'other'."""
    parts = {}
    for column, region, minus in PARTS:
        parts[column] = regions.get(region, 0.0) - (regions.get(minus, 0.0) if minus else 0.0)
    parts['other'] = regions.get('dpa.step', 0.0) - sum(parts.values())
    parts['step'] = regions.get('dpa.step', 0.0)
    return parts


def profile_variants(args) -> List[dict]:
    """Profile ``args.variants`` for every vocabulary, stage and shape (the
    image batch of each shape only)."""
    records = []
    for vocab in args.vocab_sizes:
        for stage, grid, shape_names in stage_models(args):
            trainable = ('projector', ) if stage == 'align' else ('llm', 'projector')
            model = build_model(args, vocab, trainable, grid=grid)
            optim = make_optimizer(model).optimizer
            for shape_name in shape_names:
                batch, _ = shape_batches(SHAPES[shape_name], stage, vocab, args)[0]
                steps = {variant: profiled_step(model, optim, batch,
                                                variant_loss(variant, model.split_llm))
                         for variant in args.variants}
                for _ in range(max(args.warmup, 1)):
                    for step in steps.values():
                        step()
                totals = {variant: {} for variant in steps}
                for _ in range(args.steps):
                    for variant, step in steps.items():
                        # A profiler per step: the other variants run between
                        # this variant's steps, outside it.
                        with profile(activities=[ProfilerActivity.CPU]) as prof:
                            step()
                        for region, ms in region_ms(prof, args.steps).items():
                            totals[variant][region] = totals[variant].get(region, 0.0) + ms
                for variant in steps:
                    record = dict(vocab_size=vocab, shape=shape_name, stage=stage,
                                  variant=variant, steps=args.steps,
                                  parts_ms=split_step(totals[variant]))
                    records.append(record)
                    print(f'  {record}', file=sys.stderr, flush=True)
            del model, optim
    return records
