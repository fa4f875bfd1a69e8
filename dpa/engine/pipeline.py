"""The three DPA stages as one pipeline of mmengine Runner runs.

A pipeline config holds the model parts (``llm``, ``tokenizer``,
``vision_tower``, ``image_processor``, ``model``), the data (``caption_data``,
``instruct_data``), one recipe per stage (``proxy``, ``align``, ``finetune``)
and the runtime. :func:`stage_runner_config` turns (config, stage) into a plain
mmengine Runner config whose work dir is ``work_dir/<stage>``; the stage's
:class:`DPAHook` writes its artifact and manifest there, and the next stage
reads that manifest.
"""
import copy
import itertools
import json
import logging
import os.path as osp
from typing import Dict, List, Optional, Sequence

from mmengine.config import Config, ConfigDict
from mmengine.dist import barrier, is_main_process
from mmengine.logging import print_log
from safetensors import safe_open

from dpa.datasets.llava import CAPTION_SUFFIXES, LABEL_MODES, read_rows
from dpa.datasets.mixture import data_sources
from dpa.datasets.samplers import PER_IMAGE
from dpa.datasets.synthetic import make_synthetic_data
from dpa.artifacts import read_manifest, stage_work_dir
from dpa.engine.checkpoint import latest_complete_checkpoint
from dpa.engine.compile import apply_gpu_switches, check_compile
from dpa.engine.config_guard import prepare_stage_start, record_config_changes
from dpa.engine.console import (ConsoleProgressHook, announce, build_with_console, log_file,
                                stage_console, stage_start_line)
from dpa.engine.curves import CURVES_FILE, CurvesHook
from dpa.engine.dataloader import loader_settings
from dpa.engine.distributed import (apply_strategy, build_runner, check_strategy,
                                    init_cpu_process_group, world_size)
from dpa.errors import ConfigError
from dpa.engine.hooks import SKIPPED_FILE
from dpa.engine.interrupts import (TrainingInterrupted, graceful_interrupts, requested_signal,
                                   stop_dataloader_workers)
from dpa.engine.optim import GUARDED, NonFiniteLossError
from dpa.engine.paths import fill_path_variables
from dpa.engine.precision import check_precision
from dpa.engine.staleness import (INPUT_CHECKSUMS, StaleStagesError, input_checksums,
                                  set_aside, stale_stages)
from dpa.engine.standin import make_tiny
from dpa.engine.workdir import work_dir_lock
from dpa.evaluation.stage import (EVAL_STAGE, check_eval_config, eval_summary_lines,
                                  point_at_synthetic_split, run_eval_stage)
from dpa.models.anyres import AnyRes, anyres_settings
from dpa.models.attention import packs_into_one_row
from dpa.models.builders import hf_config, llm_config, num_image_tokens
from dpa.models.gguf import gguf_path
from dpa.models.losses import VisualRelevanceLoss
from dpa.models.mllm import REFERENCE_NEEDS_MASKED
from dpa.models.proxy import check_lora

STAGES = ('proxy', 'align', 'finetune')
TEMPLATES = {'proxy': 'caption_text', 'align': 'plain', 'finetune': 'chat'}
ARTIFACTS = {'proxy': 'adapter', 'align': 'projector', 'finetune': 'model'}
TRAINABLE = {'proxy': ['lora'], 'align': ['projector'], 'finetune': ['llm', 'projector']}
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


def selected_stages(cfg: Config, stage: Optional[str] = None) -> List[str]:
    """The training stages to run; the optional last stage ``eval`` is
    validated here and run by :func:`run_pipeline` (see :func:`evaluates`)."""
    stages = list(cfg.get('stages', STAGES))
    known = list(STAGES) + [EVAL_STAGE]
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ConfigError(f'stages: unknown stage(s) {unknown}; choose among {known}')
    if stages != [s for s in known if s in stages]:
        raise ConfigError(f'stages: {stages} is out of order; the order is {known}')
    stages = [s for s in stages if s != EVAL_STAGE]
    if stage is None:
        return stages
    if stage not in stages:
        raise ConfigError(f'--stage {stage!r} is not a stage of this config ({stages})')
    return [stage]


def evaluates(cfg: Config, stage: Optional[str] = None) -> bool:
    """Whether this run ends with the ``eval`` stage (not when one training
    stage is run on its own)."""
    return stage is None and EVAL_STAGE in cfg.get('stages', STAGES)


def _check_reused_stages(cfg: Config, stages: Sequence[str]) -> None:
    for stage in stages:
        source = (cfg.get(stage) or {}).get('from_work_dir')
        if not source:
            continue
        manifest = read_manifest(source, stage)
        if manifest is None:
            raise ConfigError(f'{stage}.from_work_dir={source!r} holds no finished {stage!r} '
                              f'stage ({osp.join(source, stage, "manifest.json")} is missing)')
        if _identity((manifest.get('made_from') or {}).get('llm')) != _identity(cfg.llm):
            raise ConfigError(f'{stage}.from_work_dir={source!r} was made from another `llm` '
                              "than this config's: reuse a stage of the same base LLM")


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


def check_config(cfg: Config, stages: Sequence[str]) -> None:
    """Every mistake that can be seen without loading a model, with the key
    to fix in the message."""
    for key in ('llm', 'tokenizer', 'work_dir'):
        if key not in cfg:
            raise ConfigError(f'the config has no `{key}`')
    check_strategy(cfg)
    check_compile(cfg)
    _check_reused_stages(cfg, stages)
    check_precision(cfg, {s: cfg[s].get('trainable', TRAINABLE[s]) for s in stages})
    _check_paths(cfg, stages)
    for stage in stages:
        recipe = cfg[stage]
        for key in ('batch_size', 'global_batch_size', 'max_epochs', 'max_length'):
            value = recipe.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f'{stage}.{key} must be a positive integer, got {value!r}')
        loss = recipe.get('loss', {})
        # Building the loss and checking LoRA is cheap and validates every key.
        try:
            VisualRelevanceLoss(**loss)
            if stage == 'proxy':
                check_lora(recipe.get('lora', {}))
        except ValueError as err:
            raise ConfigError(f'{stage}.{err}') from None
        if loss.get('scope') == 'reference' and cfg.model.get('text_pass') != 'masked':
            raise ConfigError(f'{stage}.{REFERENCE_NEEDS_MASKED}')
        _check_data_switches(cfg, stage)
        if cfg.get('anyres') and stage != 'proxy':
            _check_anyres(cfg, stage)
        if recipe.get('pack') and stage != 'proxy':
            raise ConfigError(f'{stage}.pack=True: packing is for the text-only proxy stage '
                              '(images and the no-image pass need padded batches)')
        if stage != 'proxy':
            if cfg.get('vision_tower') is None:
                raise ConfigError(f'stage {stage!r} needs `vision_tower`')
            n_image = num_image_tokens(cfg.vision_tower)
            if recipe.max_length <= n_image:
                raise ConfigError(f'{stage}.max_length={recipe.max_length} leaves no room for text '
                                  f'after the {n_image} image tokens; raise it')
            if loss.get('mode', 'vanilla') != 'vanilla':
                _check_sliding_window(cfg, stage)
        batch = recipe.batch_size * launched_processes(cfg)
        if recipe.global_batch_size % batch:
            raise ConfigError(
                f'{stage}.global_batch_size={recipe.global_batch_size} is not a multiple of '
                f'{stage}.batch_size x processes = {batch}; gradient accumulation needs it')
        accumulation = recipe.global_batch_size // batch
        if recipe.get('checkpoint_interval', 500) % accumulation:
            raise ConfigError(
                f"{stage}.checkpoint_interval={recipe.get('checkpoint_interval', 500)} must be a "
                f'multiple of the {accumulation} micro-batches of an optimizer step, or a resumed '
                'run would lose the gradients accumulated before the checkpoint')
        _check_previous_artifacts(cfg, stage, stages)


def _check_data_switches(cfg: Config, stage: str) -> None:
    recipe = cfg[stage]
    choices = {'caption_suffix': CAPTION_SUFFIXES, 'labels': LABEL_MODES,
               'image_mode': (None, ) + IMAGE_MODES}
    for key, allowed in choices.items():
        if key not in recipe:
            continue
        if key not in DATA_SWITCHES[stage]:
            raise ConfigError(f'{stage}.{key} does not apply to the {stage} stage; it is a key '
                              f'of {[s for s, keys in DATA_SWITCHES.items() if key in keys]}')
        if recipe[key] not in allowed:
            raise ConfigError(f'{stage}.{key}={recipe[key]!r}: choose among {allowed}')
    mode = recipe.get('image_mode')
    if stage == 'finetune' and mode is not None and (mode == 'pad') != bool(
            cfg.get('pad_to_square', False)):
        raise ConfigError(
            f"finetune.image_mode={mode!r} disagrees with pad_to_square="
            f"{cfg.get('pad_to_square', False)}, which the final model's processors and the "
            'eval stage follow: set pad_to_square to match (or leave finetune.image_mode out)')


def _check_anyres(cfg: Config, stage: str) -> None:
    if stage_pads_images(cfg, stage):
        raise ConfigError(f'{stage}: anyres resizes and pads images to its grid itself; set '
                          f'pad_to_square=False and leave {stage}.image_mode out')
    try:
        AnyRes(**anyres_settings(cfg.anyres, cfg.vision_tower))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_sliding_window(cfg: Config, stage: str) -> None:
    """The removed no-image pass shifts later tokens closer to earlier ones in
    sequence order, which is what a sliding window (Gemma-2, Mistral) counts:
    it equals the reference's masked pass only while samples fit the window."""
    if cfg.model.get('text_pass', 'removed') != 'removed':
        return
    llm = cfg.llm
    text_cfg = llm_config(llm).get_text_config()
    window = getattr(text_cfg, 'sliding_window', None)
    if window and 'sliding_attention' in (getattr(text_cfg, 'layer_types', None) or []):
        if cfg[stage].max_length > window:
            raise ConfigError(
                f'{stage}.max_length={cfg[stage].max_length} exceeds the LLM\'s sliding window of '
                f"{window} tokens: the no-image pass would see other neighbours than the "
                "image pass; lower it or set model.text_pass='masked'")


def _identity(part) -> dict:
    """What makes two configs of a model part the same model."""
    part = plain(part) or {}
    keys = ('type', 'pretrained', 'config', 'feature_layer', 'feature_select')
    return {k: part.get(k) for k in keys}


def _check_previous_artifacts(cfg: Config, stage: str, stages: Sequence[str]) -> None:
    for role, previous in dependencies(cfg, stage).items():
        manifest = read_manifest(stage_work_dir(cfg, previous), previous, verify=True)
        if manifest is None:
            if previous not in stages:
                raise ConfigError(
                    f'stage {stage!r} needs the {role} artifact of stage {previous!r}, but '
                    f'{osp.join(cfg.work_dir, previous, "manifest.json")} does not exist: '
                    f'run `--stage {previous}` first (same --work-dir)')
            continue
        made_from = manifest.get('made_from', {})
        parts = ['llm'] + (['vision_tower'] if role == 'projector' else [])
        for part in parts:
            if _identity(made_from.get(part)) != _identity(cfg.get(part)):
                raise ConfigError(
                    f'stage {stage!r} would use the {role} of stage {previous!r} '
                    f"({manifest['artifact']}), made with {part}={_identity(made_from.get(part))}, "
                    f'but this config has {part}={_identity(cfg.get(part))}: use the same `{part}` '
                    'or another --work-dir')
        if role == 'projector':
            _check_projector_shape(cfg, osp.join(manifest['artifact'], 'projector.safetensors'))


def _check_projector_shape(cfg: Config, path: str) -> None:
    with safe_open(path, framework='pt') as weights:
        llm_dim, vision_dim = weights.get_slice('linear_1.weight').get_shape()
        has_newline = 'image_newline' in weights.keys()
    if has_newline != bool(cfg.get('anyres')):
        made, now = ('with', 'without') if has_newline else ('without', 'with')
        raise ConfigError(f'the projector in {path} was trained {made} anyres (image_newline) '
                          f'but this config is {now}: use the same `anyres` in every stage')
    vision = cfg.vision_tower
    vision_cfg = hf_config(vision.get('pretrained'), vision.get('config'))
    expected = getattr(vision_cfg, 'vision_config', None) or vision_cfg
    if expected.hidden_size != vision_dim:
        raise ConfigError(f'vision_tower: its features have {expected.hidden_size} channels but '
                          f'the projector in {path} takes {vision_dim}')
    llm = cfg.llm
    llm_cfg = llm_config(llm)
    if llm_cfg.get_text_config().hidden_size != llm_dim:
        raise ConfigError(f'llm: its hidden size is {llm_cfg.get_text_config().hidden_size} but '
                          f'the projector in {path} outputs {llm_dim}')


def _check_paths(cfg: Config, stages: Sequence[str]) -> None:
    for key in ('llm', 'tokenizer', 'vision_tower', 'image_processor'):
        part = cfg.get(key) or {}
        gguf = gguf_path(part.get('pretrained'), part.get('gguf_file'))
        if gguf is not None:
            if not osp.isfile(gguf):
                raise ConfigError(f'{key}: the GGUF checkpoint {gguf!r} does not exist')
            continue
        path = part.get('pretrained')
        if path is not None and not osp.isdir(path):
            raise ConfigError(f'{key}.pretrained={path!r} is not a directory; point it at a local '
                              'checkpoint directory or GGUF file (nothing is downloaded)')
    for data_key in sorted({cfg[s].data for s in stages}):
        data = cfg.get(data_key)
        if data is None:
            raise ConfigError(f'a stage reads `{data_key}` but the config does not define it')
        for name, source in data_sources(data).items():
            where = data_key if name == 'data' else f'{data_key}.sources.{name}'
            files = source.data_files
            files = [files] if isinstance(files, str) else files
            if not files and not cfg.get('synthetic_data'):
                raise ConfigError(f'{where}.data_files is empty: name the json/jsonl files')
            for path in files:
                if not osp.isfile(path):
                    raise ConfigError(f'{where}.data_files: {path!r} does not exist')
            folder = source.get('image_folder')
            if folder and not osp.isdir(folder):
                raise ConfigError(f'{where}.image_folder: {folder!r} is not a directory')


def prepare_synthetic_data(cfg: Config) -> None:
    """Make the embedded default's data on first use and point the datasets
    that name no files of their own at it: a dataset given ``data_files``
    keeps them (your data wins over ``synthetic_data``), as does an
    ``eval.data``. Which data each dataset reads is logged."""
    spec = cfg.get('synthetic_data')
    if not spec:
        return
    paths = make_synthetic_data(**spec)
    for data_key, files in (('caption_data', 'captions'), ('instruct_data', 'instructions')):
        for name, source in data_sources(cfg[data_key]).items():
            where = data_key if name == 'data' else f'{data_key}.sources.{name}'
            if source.get('data_files'):
                print_log(f'{where}: your data_files {list(_as_list(source.data_files))} '
                          '(synthetic_data fills only datasets without data_files)',
                          logger='current')
                continue
            source.update(data_files=[paths[files]], image_folder=paths['image_folder'])
    point_at_synthetic_split(cfg, paths)


def _as_list(files) -> list:
    return [files] if isinstance(files, str) else list(files)


def check_data_files(cfg: Config, stages: Sequence[str]) -> None:
    """Every data file the stages read parses and holds rows, checked before
    any model loads (a stage would otherwise fail only when it starts, after
    the stages before it have trained). Bad rows are left to training."""
    for data_key in sorted({cfg[s].data for s in stages}):
        for name, source in data_sources(cfg[data_key]).items():
            where = data_key if name == 'data' else f'{data_key}.sources.{name}'
            for path in _as_list(source.data_files):
                problems = []
                try:
                    rows = read_rows(path, problems)
                except (OSError, ValueError) as err:
                    raise ConfigError(f'{where}.data_files: {err}') from None
                if not rows:
                    invalid = f' ({len(problems)} invalid json lines)' if problems else ''
                    raise ConfigError(f'{where}.data_files: {path} holds no rows{invalid}; a '
                                      'LLaVA json file holds a list of rows, a jsonl file one '
                                      'row a line (tools/check_data.py checks them)')


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


def stage_runner_config(cfg: Config, stage: str, resume: bool = False) -> Config:
    """The mmengine Runner config of one stage."""
    recipe = cfg[stage]
    work_dir = osp.abspath(cfg.work_dir)
    inputs = {role: read_manifest(osp.abspath(stage_work_dir(cfg, previous)), previous)
              for role, previous in dependencies(cfg, stage).items()}
    artifacts = {role: manifest['artifact'] for role, manifest in inputs.items()}

    llm = copy.deepcopy(cfg.llm)
    if stage == 'proxy':
        llm = dict(type='ProxyLLMWrapper', llm=llm, lora=recipe.lora)
    elif 'llm_adapter' in artifacts:
        llm = dict(type='ProxyLLMWrapper', llm=llm, adapter=artifacts['llm_adapter'])
    model = dict(copy.deepcopy(cfg.model), llm=llm, tokenizer=cfg.tokenizer,
                 loss=dict(type='VisualRelevanceLoss', **recipe.loss),
                 trainable=recipe.get('trainable', TRAINABLE[stage]))
    if stage == 'proxy':
        model['vision_tower'] = None
    else:
        model['vision_tower'] = cfg.vision_tower
        if cfg.get('anyres'):
            model['anyres'] = plain(cfg.anyres)
        if 'projector' in artifacts:
            model['projector_weights'] = osp.join(artifacts['projector'], 'projector.safetensors')

    dataset = stage_dataset_config(cfg, stage)
    loader = loader_settings(cfg, stage)

    accumulation = gradient_accumulation(cfg, stage)
    made_from = dict(llm=plain(cfg.llm), **artifacts)
    made_from[INPUT_CHECKSUMS] = input_checksums(inputs)
    if stage != 'proxy':
        made_from['vision_tower'] = plain(cfg.vision_tower)
    optim_wrapper = dict(copy.deepcopy(recipe.optim_wrapper), accumulative_counts=accumulation)
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
                           # The exported processors pad exactly when stage 3 padded.
                           pad_to_square=stage_pads_images(cfg, 'finetune')),
                      dict(type='GracefulExitHook', stage=stage, accumulation=accumulation),
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


def resolve_config(cfg: Config, stage: Optional[str] = None):
    """``(config, training stages)`` as the run uses them (tiny stand-ins,
    path variables filled in), after every check that needs no model: what
    a run and a dry run (:mod:`dpa.engine.dry_run`) share."""
    if cfg.get('tiny_standin'):
        cfg = make_tiny(cfg)
    fill_path_variables(cfg)
    stages = selected_stages(cfg, stage)
    check_config(cfg, stages)
    if evaluates(cfg, stage):
        check_eval_config(cfg, stages)
    return cfg, stages


def run_pipeline(cfg: Config, stage: Optional[str] = None, resume: bool = False,
                 allow_config_change: bool = False, verbose: bool = False,
                 rerun_stale: bool = False) -> List[dict]:
    """Run the config's stages (or one), skipping finished ones; return their
    manifests. ``tiny_standin=True`` runs them on tiny random stand-ins and
    synthetic data (:mod:`dpa.engine.standin`).

    ``resume`` continues the first unfinished stage from its newest intact
    checkpoint (an error when it has none) if its config is the one it
    started with (``allow_config_change``: even if not; the manifest records
    the change). The work dir is locked for the run (:mod:`dpa.engine.workdir`).
    ``verbose`` prints mmengine's records on the console too, not only in
    each stage's log file. A finished stage made from artifacts that changed
    since is refused (:class:`StaleStagesError`), or with ``rerun_stale``
    moved aside and trained again (:mod:`dpa.engine.staleness`)."""
    cfg, stages = resolve_config(cfg, stage)
    init_cpu_process_group(cfg)
    prepare_synthetic_data(cfg)
    manifests = []
    first_unfinished = True
    with work_dir_lock(cfg.work_dir, cfg.get('launcher', 'none')), graceful_interrupts():
        stale = stale_stages(cfg, stages, dependencies)
        if stale and not rerun_stale:
            raise StaleStagesError(stale, cfg.work_dir)
        if stale and is_main_process():
            for name, folder in set_aside(cfg.work_dir, list(stale)).items():
                print_log(f'[{name}] stale ({stale[name]}): moved to {folder}, training it again',
                          logger='current', level=logging.WARNING)
        barrier()
        check_data_files(cfg, [s for s in stages
                               if read_manifest(stage_work_dir(cfg, s), s) is None])
        for name in stages:
            manifest = read_manifest(stage_work_dir(cfg, name), name)
            if manifest is not None and stage_work_dir(cfg, name) != cfg.work_dir:
                manifest['reused_from'] = stage_work_dir(cfg, name)
            if manifest is None:
                if requested_signal():
                    raise TrainingInterrupted(name, requested_signal(), 0, None)
                inputs = input_checksums({
                    role: read_manifest(stage_work_dir(cfg, previous), previous)
                    for role, previous in dependencies(cfg, name).items()})
                resumes, changes = prepare_stage_start(cfg, name, resume, first_unfinished,
                                                       launched_processes(cfg),
                                                       allow_config_change, inputs)
                first_unfinished = False
                train_stage(cfg, name, resumes, verbose)
                record_config_changes(cfg.work_dir, name, changes)
                manifest = dict(read_manifest(cfg.work_dir, name), skipped=False)
            else:
                manifest['skipped'] = True
            manifests.append(manifest)
        if evaluates(cfg, stage):
            if requested_signal():
                raise TrainingInterrupted(EVAL_STAGE, requested_signal(), 0, None)
            with stage_console(verbose):
                manifests.append(run_eval_stage(cfg))
    return manifests


def train_stage(cfg: Config, stage: str, resume: bool, verbose: bool = False) -> None:
    """Build and run one stage's Runner; the console shows a start line and a
    progress bar, mmengine's records go to its log file (``verbose``: to the
    console too; :mod:`dpa.engine.console`)."""
    accumulation = gradient_accumulation(cfg, stage)
    with stage_console(verbose, accumulation):
        _run_stage(cfg, stage, resume, verbose, accumulation)


def _run_stage(cfg: Config, stage: str, resume: bool, verbose: bool, accumulation: int) -> None:
    recipe = cfg[stage]
    runner = build_with_console(build_runner, stage_runner_config(cfg, stage, resume=resume),
                                verbose)
    apply_gpu_switches(cfg, runner)
    announce(runner, stage_start_line(
        stage, len(runner.train_dataloader.dataset), recipe.batch_size, launched_processes(cfg),
        accumulation, recipe.global_batch_size,
        max(1, len(runner.train_dataloader) * recipe.max_epochs), log_file(runner)), verbose)
    if not verbose:
        interval = (cfg.get('default_hooks') or {}).get('logger', {}).get('interval', 10)
        runner.register_hook(ConsoleProgressHook(stage, interval))
    runner.register_hook(CurvesHook(stage))
    try:
        runner.train()
    except NonFiniteLossError as err:
        last_good = latest_complete_checkpoint(runner.work_dir)
        raise NonFiniteLossError(
            f'[{stage}] {err} at iteration {runner.iter + 1}; last good checkpoint: '
            f'{last_good or "none yet"}. Lower the learning rate or fix the data, then rerun '
            'with --resume; or set skip_nonfinite_steps=True to skip such steps') from None
    finally:
        stop_dataloader_workers(runner)


def plain(value):
    """A config value as plain json data, for manifests and comparisons."""
    return json.loads(json.dumps(value.to_dict() if isinstance(value, ConfigDict) else value))


def format_summary(manifests: List[dict]) -> str:
    lines = ['DPA pipeline summary']
    for m in manifests:
        if m['stage'] == EVAL_STAGE:
            lines += eval_summary_lines(m)
            continue
        status = ('trained' if not m.get('skipped') else
                  f"reused from {m['reused_from']}" if m.get('reused_from') else
                  'skipped (artifact exists)')
        lines.append(f"  {m['stage']:<8} {status}: {m['iterations']} iterations, "
                     f"loss {m['first_loss']:.4f} -> {m['last_loss']:.4f}")
        if 'cmo' in m:
            c = m['cmo']
            lines.append(f"           CMO weight mean {c['w_mean']:.3f}, at delta_min "
                         f"{c['at_min']:.1%}, at delta_max {c['at_max']:.1%}, "
                         f"mean clamped p_img - p_txt {c['delta_mean']:.4f}")
            classes = [f"{name} {c[f'w_mean_{name}']:.3f}"
                       for name in ('content', 'template') if f'w_mean_{name}' in c]
            if classes:
                lines.append(f"           weight mean by token class: {', '.join(classes)}")
        if m.get('skipped_rows'):
            lines.append(f"           {m['skipped_rows']} bad rows skipped, listed in "
                         f"{osp.join(osp.dirname(m['artifact']), SKIPPED_FILE)}")
        lines.append(f"           {m['artifact_kind']}: {m['artifact']}")
        curves = osp.join(osp.dirname(m['artifact']), CURVES_FILE)
        if osp.isfile(curves):
            lines.append(f'           curves: {curves}')
        for note in m.get('notes', []):
            lines.append(f'           note: {note}')
    return '\n'.join(lines)
