"""What one training stage is made of, read from the pipeline config: its
data (template and data switches), collate function, sampler, the earlier
artifacts it reads, and the mmengine Runner config that
:func:`dpa.engine.pipeline.run_pipeline` builds. Nothing here loads a model.

The per-stage tables below are the recipes' fixed parts; everything else
comes from the stage's section of the config (``proxy``, ``align``,
``finetune``).
"""
import copy
import inspect
import itertools
import json
import os.path as osp
from typing import Dict, List, Optional

from mmengine.config import Config, ConfigDict

from dpa.artifacts import read_manifest, stage_work_dir
from dpa.datasets.samplers import PER_IMAGE
from dpa.engine.checkpoint import latest_complete_checkpoint
from dpa.engine.dataloader import loader_settings
from dpa.engine.distributed import apply_strategy, world_size
from dpa.engine.optim import GUARDED
from dpa.engine.staleness import INPUT_CHECKSUMS, input_checksums
from dpa.models.anyres import anyres_settings
from dpa.models.attention import packs_into_one_row
from dpa.models.builders import num_image_tokens
from dpa.registry import MODELS

STAGES = ('proxy', 'align', 'finetune')
TEMPLATES = {'proxy': 'caption_text', 'align': 'plain', 'finetune': 'chat'}
ARTIFACTS = {'proxy': 'adapter', 'align': 'projector', 'finetune': 'model'}
TRAINABLE = {'proxy': ['lora'], 'align': ['projector'], 'finetune': ['llm', 'projector']}
# The stages that may train LoRA adapters (`<stage>.lora`): the proxy always,
# stage 3 when its recipe has `lora` (then in place of the whole LLM).
LORA_STAGES = ('proxy', 'finetune')
# Per-stage data switches of the recipes (docs/fidelity.md).
DATA_SWITCHES = {'proxy': ('caption_suffix', ), 'align': ('caption_suffix', 'image_mode'),
                 'finetune': ('labels', 'image_mode')}
IMAGE_MODES = ('pad', 'square')
# mmengine keys its logger, visualizer and scope instances by experiment name
# plus a one-second timestamp: two stages started in one process within the
# same second would share the first one's log file and scalars.json.
_RUNNER_NUMBERS = itertools.count()
RUNNER_KEYS = ('default_scope', 'default_hooks', 'env_cfg', 'log_processor', 'log_level',
               'visualizer', 'randomness', 'launcher')


def launched_processes(cfg: Config) -> int:
    """Number of training processes, known before the process group exists."""
    return world_size(cfg.get('launcher', 'none'))


def stage_lora(cfg: Config, stage: str) -> Optional[dict]:
    """The ``peft.LoraConfig`` arguments of the adapters ``stage`` trains, or
    None when it trains none (``finetune`` without ``lora``: the whole LLM)."""
    if stage not in LORA_STAGES:
        return None
    lora = cfg[stage].get('lora')
    if stage == 'proxy':
        return plain(lora or {})
    return None if lora is None else plain(lora)


def stage_trainable(cfg: Config, stage: str) -> List[str]:
    """The parts ``stage`` trains: the recipe's ``trainable``, else the stage's
    default, with LoRA adapters in place of the LLM when the recipe has ``lora``."""
    recipe = cfg[stage]
    if 'trainable' in recipe:
        return list(recipe.trainable)
    if stage_lora(cfg, stage) is not None:
        return ['lora' if part == 'llm' else part for part in TRAINABLE[stage]]
    return list(TRAINABLE[stage])


def projector_lr_settings(cfg: Config, stage: str) -> dict:
    """The optimizer wrapper keys that give the projector its own learning
    rate (``<stage>.projector_lr``, LLaVA's ``mm_projector_lr``), or none."""
    projector_lr = cfg[stage].get('projector_lr')
    if projector_lr is None:
        return {}
    return dict(constructor='ProjectorLrConstructor',
                paramwise_cfg=dict(projector_lr=projector_lr))


def dependencies(cfg: Config, stage: str) -> Dict[str, str]:
    """Which earlier stages' artifacts ``stage`` reads, by role."""
    recipe = cfg[stage]
    if stage == 'align' and recipe.get('use_proxy', True):
        return {'llm_adapter': 'proxy'}
    if stage == 'finetune':
        deps = {'projector': 'align'}
        if recipe.get('init_from_proxy', False):
            deps['llm_adapter'] = 'proxy'
        return deps
    return {}


def stage_pads_images(cfg: Config, stage: str) -> bool:
    """Whether ``stage`` pads images to a square: its recipe's ``image_mode``
    (``'pad'`` or ``'square'``, the processor's own resize and centre crop),
    else the config's ``pad_to_square``."""
    mode = cfg[stage].get('image_mode')
    if mode is None:
        return bool(cfg.get('pad_to_square', False))
    return mode == 'pad'


def stage_dataset_config(cfg: Config, stage: str) -> dict:
    """The dataset config of one stage: its data with the stage's template
    and the recipe's data switches (``caption_suffix``, ``labels``,
    ``image_mode``; see docs/fidelity.md)."""
    recipe = cfg[stage]
    dataset = dict(type='LLaVADataset', template=TEMPLATES[stage], tokenizer=cfg.tokenizer,
                   max_length=recipe.max_length)
    if stage == 'finetune':
        dataset.update(labels=recipe.get('labels', 'assistant'))
    else:
        dataset.update(caption_suffix=recipe.get('caption_suffix', 'eos'))
    dataset.update(copy.deepcopy(cfg[recipe.data]))
    if stage != 'proxy':
        dataset.update(image_processor=cfg.image_processor,
                       num_image_tokens=num_image_tokens(cfg.vision_tower),
                       pad_to_square=stage_pads_images(cfg, stage))
        if 'max_image_pixels' in cfg:
            dataset.update(max_image_pixels=cfg.max_image_pixels)
        if cfg.get('anyres'):
            dataset.update(anyres=anyres_settings(cfg.anyres, cfg.vision_tower))
    return dataset


def stage_collate_config(cfg: Config, stage: str) -> dict:
    """Padded batches; with the recipe's ``pack``, packed rows, one row per batch
    where the LLM's attention kernel needs it to keep the samples apart."""
    if not cfg[stage].get('pack'):
        return dict(type='dpa.dpa_collate')
    if packs_into_one_row(cfg.llm):
        return dict(type='dpa.packed_collate', one_row=True)
    return dict(type='dpa.packed_collate')


def stage_sampler_config(cfg: Config, stage: str) -> dict:
    """Shuffled samples; with the recipe's ``group_by_modality_length``, batches
    of one modality and similar lengths (see ``ModalityLengthGroupedSampler``)."""
    recipe = cfg[stage]
    if not recipe.get('group_by_modality_length'):
        return dict(type='DefaultSampler', shuffle=True, seed=cfg.get('seed'))
    image_length = 0 if stage == 'proxy' else num_image_tokens(cfg.vision_tower)
    if cfg.get('anyres') and stage != 'proxy':
        image_length = PER_IMAGE  # AnyRes: each image's own number of tokens
    return dict(type='ModalityLengthGroupedSampler', batch_size=recipe.batch_size,
                image_length=image_length, seed=cfg.get('seed'))


def stage_model_config(cfg: Config, stage: str,
                       artifacts: Optional[Dict[str, str]] = None) -> dict:
    """The ``LlavaDPAModel`` config of one stage: the config's LLM (with the
    stage's LoRA adapters, or the proxy's adapter), tokenizer, vision tower
    and loss, and the parts the stage trains. ``artifacts``: the earlier
    stages' outputs by role (``llm_adapter``, ``projector``); none: the stage
    starts from the checkpoints alone (the benchmark's model)."""
    artifacts = artifacts or {}
    recipe = cfg[stage]
    llm = copy.deepcopy(cfg.llm)
    lora = stage_lora(cfg, stage)
    if lora is not None:
        # A fresh adapter, on the merged proxy when stage 3 starts from it.
        llm = dict(type='ProxyLLMWrapper', llm=llm, lora=lora,
                   adapter=artifacts.get('llm_adapter'))
    elif 'llm_adapter' in artifacts:
        llm = dict(type='ProxyLLMWrapper', llm=llm, adapter=artifacts['llm_adapter'])
    model = dict(copy.deepcopy(cfg.model), llm=llm, tokenizer=cfg.tokenizer,
                 loss=dict(type='VisualRelevanceLoss', **recipe.loss),
                 trainable=stage_trainable(cfg, stage))
    if stage == 'proxy':
        model['vision_tower'] = None
    else:
        model['vision_tower'] = cfg.vision_tower
        if cfg.get('anyres'):
            model['anyres'] = plain(cfg.anyres)
        if 'projector' in artifacts:
            model['projector_weights'] = osp.join(artifacts['projector'], 'projector.safetensors')
    return model


def stage_runner_config(cfg: Config, stage: str, resume: bool = False,
                        made_by: Optional[dict] = None) -> Config:
    """The mmengine Runner config of one stage; ``made_by`` (the stage's
    resolved config, :func:`dpa.engine.config_guard.result_config`) goes to
    its manifest."""
    recipe = cfg[stage]
    work_dir = osp.abspath(cfg.work_dir)
    inputs = {role: read_manifest(osp.abspath(stage_work_dir(cfg, previous)), previous)
              for role, previous in dependencies(cfg, stage).items()}
    artifacts = {role: manifest['artifact'] for role, manifest in inputs.items()}

    model = stage_model_config(cfg, stage, artifacts)
    dataset = stage_dataset_config(cfg, stage)
    loader = loader_settings(cfg, stage)

    accumulation = gradient_accumulation(cfg, stage)
    made_from = dict(llm=plain(cfg.llm), **artifacts)
    made_from[INPUT_CHECKSUMS] = input_checksums(inputs)
    if stage != 'proxy':
        made_from['vision_tower'] = plain(cfg.vision_tower)
    optim_wrapper = dict(copy.deepcopy(recipe.optim_wrapper), accumulative_counts=accumulation,
                         **projector_lr_settings(cfg, stage))
    if optim_wrapper.get('type', 'OptimWrapper') in GUARDED:
        optim_wrapper.update(type=GUARDED[optim_wrapper.get('type', 'OptimWrapper')],
                             skip_nonfinite=cfg.get('skip_nonfinite_steps', False))
    resume_from = latest_complete_checkpoint(osp.join(work_dir, stage)) if resume else None
    runner_cfg = {key: copy.deepcopy(cfg[key]) for key in RUNNER_KEYS if key in cfg}
    if cfg.get('seed') is not None:
        # `randomness.seed` was fixed when the config file was read; `seed`
        # (e.g. --cfg-options seed=3) is the one knob, so it wins.
        runner_cfg['randomness'] = dict(cfg.get('randomness') or {}, seed=cfg.seed)
    runner_cfg.update(
        work_dir=osp.join(work_dir, stage),
        experiment_name=f'{stage}-{next(_RUNNER_NUMBERS)}',
        model=model,
        train_dataloader=dict(
            batch_size=recipe.batch_size,
            **loader,
            worker_init_fn=dict(type='dpa.signal_safe_worker_init',
                                num_workers=loader['num_workers'], seed=cfg.get('seed')),
            sampler=stage_sampler_config(cfg, stage),
            collate_fn=stage_collate_config(cfg, stage),
            dataset=dataset),
        train_cfg=dict(type='EpochsAsItersTrainLoop', max_epochs=recipe.max_epochs),
        optim_wrapper=optim_wrapper,
        param_scheduler=dict(type='WarmupCosineLR', warmup_ratio=recipe.warmup_ratio,
                             accumulation=accumulation,
                             by_epoch=True, begin=0, end=recipe.max_epochs,
                             convert_to_iter_based=True),
        custom_hooks=[dict(type='DPAHook', stage=stage, artifact=ARTIFACTS[stage],
                           work_dir=work_dir, made_from=made_from, tokenizer=cfg.tokenizer,
                           image_processor=cfg.get('image_processor'),
                           max_bad_fraction=cfg.get('max_bad_fraction', 0.01),
                           max_nonfinite_fraction=cfg.get('max_nonfinite_fraction', 0.5),
                           # The exported processors pad exactly when stage 3 padded.
                           pad_to_square=stage_pads_images(cfg, 'finetune'),
                           # As json text: its keys (file paths) hold dots.
                           made_by=None if made_by is None else json.dumps(made_by)),
                      dict(type='GracefulExitHook', stage=stage, accumulation=accumulation),
                      dict(type='IterationSeedHook'),
                      dict(type='RelevanceHistogramHook', stage=stage)]
        + copy.deepcopy(cfg.get('custom_hooks', [])),
        # The newest complete checkpoint, not mmengine's last_checkpoint pointer.
        resume=resume_from is not None,
        load_from=resume_from)
    runner_cfg['default_hooks']['checkpoint']['interval'] = recipe.get('checkpoint_interval', 500)
    return Config(apply_strategy(runner_cfg, cfg, stage, accumulation))


def gradient_accumulation(cfg: Config, stage: str) -> int:
    """Micro-batches per optimizer step, so that the global batch holds
    whatever the number of processes."""
    recipe = cfg[stage]
    return recipe.global_batch_size // (recipe.batch_size * launched_processes(cfg))


def plain(value):
    """A config value as plain json data, for manifests and comparisons."""
    return json.loads(json.dumps(value.to_dict() if isinstance(value, ConfigDict) else value))


# Keys of a model part that say how its weights are run, not what they are.
RUN_ONLY_PART_KEYS = ('attn_implementation', 'torch_dtype', 'trust_remote_code',
                      'use_checkpoint_code')


def part_identity(part) -> dict:
    """What makes two configs of a model part the same weights: every key
    (``init_seed`` of a random stand-in, its ``config`` with any override, a
    checkpoint path, the feature layer ...) but those of
    :data:`RUN_ONLY_PART_KEYS`, with the builder's defaults filled in, so
    ``init_seed=0`` and no ``init_seed`` are one identity."""
    part = plain(part) or {}
    builder = MODELS.get(part['type']) if isinstance(part.get('type'), str) else None
    defaults = {}
    if builder is not None:
        defaults = {name: p.default for name, p in inspect.signature(builder).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    full = plain({**defaults, **part})
    return {k: v for k, v in sorted(full.items()) if k not in RUN_ONLY_PART_KEYS}
