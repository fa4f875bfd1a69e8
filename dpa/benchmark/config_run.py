"""Training steps of a real config's model: ``tools/benchmark.py --config PATH``.

    python tools/benchmark.py --config configs/dpa_smollm2_135m.py
    python tools/benchmark.py --config configs/dpa_smollm2_135m.py --real-weights

The synthetic shapes time a random Qwen2 of the sizes given as flags beside a
small CLIP; this mode times the model a run of the config trains, on the
batches it trains on, so the figures are the ones the user's run gets:

- **model**: each stage's ``LlavaDPAModel`` as the pipeline builds it
  (:func:`dpa.engine.stage_config.stage_model_config`: the config's LLM,
  vision tower, projector, ``loss_chunk_size``, ``text_pass``, gradient
  checkpointing, LoRA and trainable parts), with *random weights at the
  checkpoints' shape*: the LLM's and the vision tower's transformers configs
  are read from their checkpoints (a GGUF file's header, a checkpoint
  folder's ``config.json``: a folder holding only that file is enough) and
  built with random weights. Timing does not depend on the weights except
  through CMO's scoring, which skips the no-image score of a target whose
  image probability is at most ``delta_min``: a random model puts every
  target there (CMO's best case). ``--real-weights`` loads the checkpoints
  instead (the cost of the scoring a pretrained model gives);
- **batches**: the stage's own dataset and collate function at the recipe's
  per-device batch size (``batch_size``), the first rows with an image; in
  stage 3 with ``group_by_modality_length`` also a batch of text-only rows,
  the step figures then being the two weighted by their share of the rows (as
  the synthetic ``instruct`` shape is). A config on the synthetic set makes it
  under a temporary folder;
- **optimizer**: the stage's ``optim_wrapper`` (its AdamW settings, ``fused``
  included, and gradient clipping).

The variants, the interleaved timing, the peak memory and the table are the
synthetic shapes' (:mod:`dpa.benchmark.training`); ``shape`` in the table and
the records is the stage's data key (``caption_data``, ``instruct_data``).
"""
import copy
import os.path as osp
import sys
import tempfile
from typing import List, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

from dpa.datasets.samplers import modality_lengths
from dpa.engine.pipeline import prepare_synthetic_data
from dpa.engine.preflight import resolve_config
from dpa.engine.stage_config import (stage_collate_config, stage_dataset_config,
                                     stage_model_config)
from dpa.errors import ConfigError
from dpa.models.builders import hf_config, llm_config
from dpa.registry import DATASETS, FUNCTIONS, MODELS

from .training import time_variants, variant_loss

CONFIG_STAGES = ('align', 'finetune')
# Keys of a transformers config that describe the file, not the model.
FILE_KEYS = ('architectures', 'transformers_version', '_name_or_path', 'dtype', 'torch_dtype',
             'auto_map', '_commit_hash')


def _shape_config(config) -> dict:
    """A transformers config as the ``config`` dict of a random stand-in."""
    values = config.to_dict()
    for key in FILE_KEYS:
        values.pop(key, None)
    return values


def random_llm(llm: dict) -> dict:
    """``llm`` (an ``HFCausalLM`` config) with random weights at its
    checkpoint's shape: its transformers config read without loading weights."""
    if llm.get('pretrained') is None and llm.get('gguf_file') is None:
        return dict(llm)  # already a random model built from a config
    try:
        config = llm_config(llm)
    except Exception as err:
        raise ConfigError(f"--config: the LLM's shape cannot be read from "
                          f"{llm.get('pretrained')!r} ({type(err).__name__}: {err}); point "
                          'llm_path at a local checkpoint (its config.json is enough)') from err
    spec = {k: v for k, v in llm.items() if k not in ('pretrained', 'gguf_file',
                                                          'use_checkpoint_code')}
    return dict(spec, config=_shape_config(config))


def random_vision_tower(vision: dict, feature_cache: str) -> dict:
    """``vision`` (an ``HFVisionTower`` config) with random weights at its
    checkpoint's shape; a feature cache goes to ``feature_cache``."""
    vision = dict(vision)
    if vision.get('feature_cache'):
        vision['feature_cache'] = feature_cache  # not the user's cache of the real tower
    if vision.get('pretrained') is None:
        return vision
    try:
        config = hf_config(vision.pop('pretrained'))
    except Exception as err:
        raise ConfigError(f"--config: the vision tower's shape cannot be read ({type(err).__name__}"
                          f': {err})') from err
    config = getattr(config, 'vision_config', None) or config  # a full CLIP/SigLIP
    return dict(vision, config=_shape_config(config))


def load_config(path: str, options: Optional[dict], work_dir: str,
                stages=CONFIG_STAGES) -> Tuple[Config, List[str]]:
    """The resolved config of ``path`` (synthetic data and work folder under
    ``work_dir``) and the stages among ``stages`` it trains.

    Raises:
        ConfigError: the config cannot be benchmarked (no such stage, or a
            mistake the run's own checks refuse), with the reason.
    """
    if not osp.isfile(path):
        raise ConfigError(f'--config {path}: no such file')
    cfg = Config.fromfile(path)
    if options:
        cfg.merge_from_dict(options)
    if cfg.get('tiny_standin'):
        cfg.standin_data_root = osp.join(work_dir, 'standin_data')
    elif cfg.get('synthetic_data'):
        cfg.synthetic_data = dict(cfg.synthetic_data, root=osp.join(work_dir, 'synthetic_data'))
    cfg.work_dir = osp.join(work_dir, 'work')  # checked, never written
    cfg, trained = resolve_config(cfg)
    chosen = [stage for stage in stages if stage in trained]
    if not chosen:
        raise ConfigError(f'--config {path}: it trains none of the stages {list(stages)} '
                          f'(its training stages: {list(trained)}); the benchmark times the '
                          'stages with images, align and finetune')
    prepare_synthetic_data(cfg)
    return cfg, chosen


def stage_batches(cfg: Config, stage: str, device: str) -> List[Tuple[dict, float]]:
    """(batch, share of the steps) of a stage: the first ``batch_size`` rows
    with an image, and with ``group_by_modality_length`` in stage 3 the first
    ``batch_size`` text-only rows, each batch weighted by its modality's
    share of the rows."""
    recipe = cfg[stage]
    dataset = DATASETS.build(stage_dataset_config(cfg, stage))
    collate_cfg = dict(stage_collate_config(cfg, stage))
    collate = FUNCTIONS.get(collate_cfg.pop('type'))
    _, has_image = modality_lengths(dataset, 0)
    images = [i for i, image in enumerate(has_image) if image]
    texts = [i for i, image in enumerate(has_image) if not image]
    if not images:
        raise ConfigError(f'{stage}: its data ({recipe.data}) has no row with an image')
    if stage == 'finetune' and recipe.get('group_by_modality_length') and texts:
        groups = [(images, len(images) / len(has_image)), (texts, len(texts) / len(has_image))]
    else:
        groups = [(images, 1.0)]
    batches = []
    for rows, share in groups:
        batch = collate([dataset[i] for i in rows[:recipe.batch_size]], **collate_cfg)
        batches.append(({k: v.to(device) for k, v in batch.items() if v is not None}, share))
    return batches


def stage_model(cfg: Config, stage: str, real_weights: bool, work_dir: str, device: str):
    """The stage's ``LlavaDPAModel``, random at the checkpoints' shape unless
    ``real_weights``."""
    cfg = copy.deepcopy(cfg)
    if not real_weights:
        cfg.llm = random_llm(cfg.llm)
        cfg.vision_tower = random_vision_tower(cfg.vision_tower,
                                               osp.join(work_dir, 'feature_cache'))
    return MODELS.build(stage_model_config(cfg, stage)).to(device).train()


def describe(model, batches, cfg: Config, stage: str) -> dict:
    """What the records say about the model and the batch timed."""
    text = model.llm.config.get_text_config()
    tower = model.vision_tower
    batch = batches[0][0]
    return dict(
        dtype=str(next(model.llm.parameters()).dtype).replace('torch.', ''),
        llm_type=text.model_type, hidden_size=text.hidden_size,
        layers=text.num_hidden_layers, intermediate_size=text.intermediate_size,
        heads=text.num_attention_heads,
        kv_heads=getattr(text, 'num_key_value_heads', text.num_attention_heads),
        vocab_size=model.llm.get_output_embeddings().out_features,
        llm_params=sum(p.numel() for p in model.llm.parameters()),
        vision_type=tower.model.config.model_type, vision_hidden=tower.hidden_size,
        vision_layers=tower.model.config.num_hidden_layers, image_size=tower.image_size,
        image_tokens=int((batch['input_ids'] == model.image_token_id).sum()) // max(
            int(batch['pixel_values'].shape[0]), 1),
        trainable=list(stage_model_config(cfg, stage)['trainable']),
        batch_size=int(batch['input_ids'].shape[0]), row_length=int(batch['input_ids'].shape[1]),
        batches=[dict(rows=int(b['input_ids'].shape[0]), length=int(b['input_ids'].shape[1]),
                      tokens=int(b['attention_mask'].sum()), share=share,
                      images=int(b['pixel_values'].shape[0]) if 'pixel_values' in b else 0)
                 for b, share in batches])


def run_config_variants(args, work_dir: Optional[str] = None) -> List[dict]:
    """One record per (stage, variant) of ``args.config``'s model on its own
    batches (see the module docstring)."""
    work_dir = work_dir or tempfile.mkdtemp(prefix='dpa_benchmark_config_')
    cfg, stages = load_config(args.config, args.cfg_options, work_dir, args.stages)
    records = []
    for stage in stages:
        model = stage_model(cfg, stage, args.real_weights, work_dir, args.device)
        optim = build_optim_wrapper(model, copy.deepcopy(cfg[stage].optim_wrapper))
        batches = stage_batches(cfg, stage, args.device)
        about = describe(model, batches, cfg, stage)
        losses = {variant: variant_loss(variant, model.split_llm) for variant in args.variants}
        for variant, result in time_variants(model, optim, losses, batches, args).items():
            records.append(dict(config=osp.basename(args.config), shape=cfg[stage].data,
                                stage=stage, variant=variant, real_weights=args.real_weights,
                                **about, **result))
            print(f'  {records[-1]}', file=sys.stderr, flush=True)
        del model, optim
    return records


def config_markdown(records: List[dict], args) -> str:
    """The records as the synthetic shapes' table, under a line per stage
    saying what model and batch were timed."""
    from .report import step_rows, threads
    lines = []
    for stage in dict.fromkeys(r['stage'] for r in records):
        r = next(r for r in records if r['stage'] == stage)
        weights = 'its checkpoints\' weights' if r['real_weights'] else \
            "random weights at its checkpoints' shape"
        batches = ', '.join(f"{b['rows']} x {b['length']} ({b['tokens']} tokens, "
                            f"{b['images']} images, {b['share']:.0%} of the steps)"
                            for b in r['batches'])
        lines.append(f"{r['config']} {stage} ({weights}; trains {', '.join(r['trainable'])}): "
                     f"{r['llm_type']} hidden {r['hidden_size']}, {r['layers']} layers, "
                     f"intermediate {r['intermediate_size']}, {r['heads']} heads / "
                     f"{r['kv_heads']} kv, vocab {r['vocab_size']} "
                     f"({r['llm_params'] / 1e6:.1f} M); {r['vision_type']} hidden "
                     f"{r['vision_hidden']}, {r['vision_layers']} layers, {r['image_size']} px "
                     f"({r['image_tokens']} image tokens); batches {batches}.")
    lines += ['', f"{records[0]['dtype']} on {args.device}, "
              f'{threads(torch.get_num_threads())}; median of {args.steps} steps '
              f'({args.reference_steps} for cmo_reference) after {args.warmup} warm-up '
              f'step(s) and a round measuring memory; {args.clock} clock.', '']
    lines += step_rows(records)
    return '\n'.join(lines)
