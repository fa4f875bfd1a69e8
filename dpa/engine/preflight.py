"""Is this config runnable, and what will the run do: every check that needs
no model, in the order a stage needs it, and the plan that both
:func:`dpa.engine.pipeline.run_pipeline` follows and ``--dry-run`` prints.

Each component keeps its own check beside its code (``check_strategy``,
``check_lora``, ``check_anyres_config``, ``check_projector_file``,
``check_data_sources``, the eval stage's ``check`` ...); this module calls
them, per stage, in one order:

1. :func:`resolve_config`: :func:`prepare_config` (tiny stand-ins, path
   variables, the stages to run (:func:`selected_stages`), the synthetic
   data's settings: what ``tools/check_data.py`` needs too), then
   :func:`check_config`: the whole-run checks, each training stage's checks
   (numbers of the recipe included), the closing stages' checks.
2. :func:`plan_stages`: the work dir's state (finished, reused from another
   work dir, stale, to train) and the data files of the stages that train.

A run takes its work-dir lock between the two, so the state it follows is
the state it holds the lock on.
"""
import copy
import inspect
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from mmengine.config import Config
from mmengine.logging import print_log

from dpa.artifacts import read_manifest, stage_work_dir
from dpa.datasets.llava import CAPTION_SUFFIXES, LABEL_MODES
from dpa.datasets.mixture import (as_list, check_data_files, check_data_sources, data_sources,
                                  source_name)
from dpa.datasets.synthetic import (CAPTION_STYLES, check_always_ask, make_synthetic_data,
                                    synthetic_data_paths)
from dpa.engine.compile import check_compile
from dpa.engine.config_guard import result_config
from dpa.engine.distributed import check_strategy
from dpa.engine.optim import optimizer_problems
from dpa.engine.paths import fill_path_variables
from dpa.engine.precision import check_precision, warn_cpu_bf16
from dpa.engine.stage_config import (DATA_SWITCHES, IMAGE_MODES, LORA_STAGES, STAGES,
                                     dependencies, launched_processes, part_identity,
                                     stage_lora, stage_pads_images, stage_trainable)
from dpa.engine.stages import build_stage, closing_stage_names, stage_names
from dpa.engine.staleness import (StaleStagesError, describe_differences, made_differently,
                                  stale_stages)
from dpa.engine.standin import make_tiny
from dpa.errors import ConfigError
from dpa.models.anyres import check_anyres_config
from dpa.models.builders import check_checkpoint_paths, num_image_tokens
from dpa.models.vision import check_image_size
from dpa.models.losses import VisualRelevanceLoss
from dpa.models.mllm import (check_reference_scope, check_sliding_window,
                             check_text_context_config)
from dpa.models.projector import check_projector_file
from dpa.models.proxy import check_lora

# What a training stage's plan says it does.
NEW, FINISHED, REUSED, STALE = 'new', 'finished', 'reused', 'stale'


@dataclass
class StagePlan:
    """One stage of a run's plan.

    Attributes:
        name: the stage.
        trains: a training stage (``proxy``, ``align``, ``finetune``).
        state: ``'new'`` (it runs), ``'finished'`` (skipped, its artifact
            exists), ``'reused'`` (a finished stage of ``from_work_dir``) or
            ``'stale'`` (finished, made from an artifact that changed since:
            refused, or trained again with ``--rerun-stale``).
        work_dir: where its manifest is (or will be).
        reason: why it is stale.
    """
    name: str
    trains: bool
    state: str
    work_dir: str
    reason: Optional[str] = None

    @property
    def runs(self) -> bool:
        return self.state in (NEW, STALE)


@dataclass
class RunPlan:
    """What a run will do: the resolved config and its stages, in order."""
    cfg: Config
    stages: List[StagePlan]

    @property
    def stale(self) -> Dict[str, str]:
        return {s.name: s.reason for s in self.stages if s.state == STALE}


def selected_stages(cfg: Config, stage: Optional[str] = None) -> List[str]:
    """The training stages to run; the closing stages (``eval``) the config
    lists are checked for order here and run after them (see
    :func:`closing_stages`)."""
    stages = list(cfg.get('stages', STAGES))
    known = stage_names()
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ConfigError(f'stages: unknown stage(s) {unknown}; choose among {known}')
    if stages != [s for s in known if s in stages]:
        raise ConfigError(f'stages: {stages} is out of order; the order is {known}')
    stages = [s for s in stages if s in STAGES]
    if stage is None:
        return stages
    if stage not in stages:
        raise ConfigError(f'--stage {stage!r} is not a stage of this config ({stages})')
    return [stage]


def closing_stages(cfg: Config, stage: Optional[str] = None) -> List[str]:
    """The stages after training the config lists (``eval``); none when one
    training stage is run on its own."""
    if stage is not None:
        return []
    return [s for s in cfg.get('stages', STAGES) if s not in STAGES]


def resolve_parts(cfg: Config) -> Config:
    """The config with the tiny stand-ins (``tiny_standin``) and its path
    variables filled in: what every reader of a config's data and models
    (the run, ``tools/check_data.py``) starts from."""
    if cfg.get('tiny_standin'):
        cfg = make_tiny(cfg)
    fill_path_variables(cfg)
    return cfg


def prepare_config(cfg: Config, stage: Optional[str] = None):
    """``(config, training stages)`` with the parts resolved
    (:func:`resolve_parts`), the stages checked for order and the synthetic
    data's settings checked: the config every tool reads its data paths
    from (``tools/check_data.py`` stops here; a run goes on to
    :func:`check_config`)."""
    cfg = resolve_parts(cfg)
    stages = selected_stages(cfg, stage)
    check_synthetic_data(cfg.get('synthetic_data'))
    return cfg, stages


def check_synthetic_data(spec) -> None:
    """``synthetic_data`` names settings :func:`make_synthetic_data` takes,
    with a known caption style, positive counts and known question types."""
    if not spec:
        return
    taken = inspect.signature(make_synthetic_data).parameters
    unknown = sorted(set(spec) - set(taken))
    if unknown:
        raise ConfigError(f'synthetic_data: no setting(s) {unknown}; it takes {sorted(taken)}')
    style = spec.get('caption_style', 'plain')
    if style not in CAPTION_STYLES:
        raise ConfigError(f'synthetic_data.caption_style={style!r}: choose one of '
                          f'{sorted(CAPTION_STYLES)}')
    for key in ('num_captions', 'num_instructions', 'image_size'):
        value = spec.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f'synthetic_data.{key} must be a positive integer, got {value!r}')
    try:
        check_always_ask(spec.get('always_ask'))
    except ValueError as error:
        raise ConfigError(str(error)) from None


def resolve_config(cfg: Config, stage: Optional[str] = None):
    """``(config, training stages)`` as the run uses them (tiny stand-ins,
    path variables filled in), after every check that needs no model."""
    cfg, stages = prepare_config(cfg, stage)
    check_config(cfg, stages)
    for name in closing_stages(cfg, stage):
        build_stage(name).check(cfg, stages)
    return cfg, stages


def check_config(cfg: Config, stages: Sequence[str]) -> None:
    """Every mistake of the training stages ``stages`` that can be seen
    without loading a model, with the key to fix in the message."""
    for key in ('llm', 'tokenizer', 'work_dir'):
        if key not in cfg:
            raise ConfigError(f'the config has no `{key}`')
    for key, default in (('max_bad_fraction', 0.01), ('max_nonfinite_fraction', 0.5)):
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 <= value <= 1:
            raise ConfigError(f'{key}={value!r}: a share of the stage, a number in [0, 1] '
                              f'such as {default}')
    check_strategy(cfg)
    check_compile(cfg)
    _check_reused_stages(cfg, stages)
    check_precision(cfg, {s: stage_trainable(cfg, s) for s in stages})
    warn_cpu_bf16(cfg)
    check_checkpoint_paths(cfg)
    if not cfg.get('anyres'):
        check_image_size(cfg.get('vision_tower'), cfg.get('image_processor'))
    check_data_sources(cfg, sorted({cfg[s].data for s in stages}))
    for stage in stages:
        _check_training_stage(cfg, stage, stages)


def _check_training_stage(cfg: Config, stage: str, stages: Sequence[str]) -> None:
    recipe = cfg[stage]
    for key in ('batch_size', 'global_batch_size', 'max_epochs', 'max_length'):
        value = recipe.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f'{stage}.{key} must be a positive integer, got {value!r}')
    _check_recipe_numbers(recipe, stage)
    loss = recipe.get('loss', {})
    # Building the loss and checking LoRA is cheap and validates every key.
    try:
        VisualRelevanceLoss(**loss)
    except ValueError as err:
        raise ConfigError(f'{stage}.{err}') from None
    _check_stage_lora(cfg, stage)
    check_reference_scope(cfg.model.get('text_pass'), loss, stage)
    check_text_context_config(cfg, loss, stage)
    _check_data_switches(cfg, stage)
    if cfg.get('anyres') and stage != 'proxy':
        check_anyres_config(cfg.anyres, cfg.vision_tower, stage, stage_pads_images(cfg, stage))
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
            check_sliding_window(cfg.llm, cfg.model.get('text_pass', 'removed'),
                                 recipe.max_length, stage)
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


def _check_stage_lora(cfg: Config, stage: str) -> None:
    """LoRA settings, and the trainable parts and learning rates that go
    with them: a stage trains LoRA adapters exactly when its recipe has
    ``lora``, never beside the whole LLM they would adapt."""
    recipe = cfg[stage]
    if 'lora' in recipe and stage not in LORA_STAGES:
        raise ConfigError(f'{stage}.lora: the {stage} stage trains no LLM weights; LoRA applies '
                          f'to the stages {LORA_STAGES}')
    lora = stage_lora(cfg, stage)
    if lora is not None:
        try:
            check_lora(lora)
        except ValueError as err:
            raise ConfigError(f'{stage}.{err}') from None
    trainable = stage_trainable(cfg, stage)
    if 'lora' in trainable and lora is None:
        raise ConfigError(f"{stage}.trainable names 'lora' but {stage}.lora is not set; give "
                          f'{stage}.lora.r=... (and lora_alpha) to train adapters')
    if lora is not None and 'llm' in trainable:
        raise ConfigError(f"{stage}.trainable={trainable}: 'llm' trains every weight of the LLM "
                          f'that {stage}.lora adapts; train one of the two')
    projector_lr = recipe.get('projector_lr')
    if projector_lr is not None:
        if 'projector' not in trainable or len(trainable) == 1:
            raise ConfigError(f'{stage}.projector_lr: the stage trains {trainable}; a separate '
                              'projector learning rate needs the projector and another part')
        for key, problem, fix in optimizer_problems(
                dict(optimizer=dict(lr=projector_lr)), stage):
            raise ConfigError(f'{stage}.projector_lr: {problem}; set {fix}')


def _check_recipe_numbers(recipe, stage: str) -> None:
    """The optimizer's numbers and the warm-up share: a NaN or negative
    learning rate, a beta outside [0, 1), a negative weight decay pass
    mmengine and fail (or silently diverge) in the first step."""
    for key, problem, fix in optimizer_problems(recipe.get('optim_wrapper'),
                                                f'{stage}.optim_wrapper'):
        raise ConfigError(f'{key}: {problem}; set {fix} (--cfg-options {key}=...)')
    ratio = recipe.get('warmup_ratio', 0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ConfigError(f'{stage}.warmup_ratio={ratio!r}: the share of the steps that warm '
                          'up, a number in [0, 1] such as 0.03')


def _check_reused_stages(cfg: Config, stages: Sequence[str]) -> None:
    for stage in stages:
        source = (cfg.get(stage) or {}).get('from_work_dir')
        if not source:
            continue
        manifest = read_manifest(source, stage)
        if manifest is None:
            raise ConfigError(f'{stage}.from_work_dir={source!r} holds no finished {stage!r} '
                              f'stage ({osp.join(source, stage, "manifest.json")} is missing)')
        made_from = manifest.get('made_from') or {}
        for part in ['llm'] + (['vision_tower'] if 'vision_tower' in made_from else []):
            changes = made_differently(part_identity(made_from.get(part)),
                                       part_identity(cfg.get(part)))
            if changes:
                raise ConfigError(
                    f'{stage}.from_work_dir={source!r} was made from another `{part}` than this '
                    f"config's ({describe_differences(changes)}, theirs -> yours): its weights "
                    f'belong to another base model; reuse a stage made with the same `{part}`')


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
            changes = made_differently(part_identity(made_from.get(part)),
                                       part_identity(cfg.get(part)))
            if changes:
                then = {key: old for key, (old, _) in changes.items()}
                now = {key: new for key, (_, new) in changes.items()}
                raise ConfigError(
                    f'stage {stage!r} would use the {role} of stage {previous!r} '
                    f"({manifest['artifact']}), made with {part}={then}, but this config has "
                    f'{part}={now}: use the same `{part}` or another --work-dir')
        if role == 'projector':
            check_projector_file(osp.join(manifest['artifact'], 'projector.safetensors'),
                                 cfg.llm, cfg.vision_tower, bool(cfg.get('anyres')))


def plan_stages(cfg: Config, stages: Sequence[str], stage: Optional[str] = None,
                refuse_stale: bool = True, compared: Optional[Config] = None) -> RunPlan:
    """The plan of a resolved config: each training stage's state in the work
    dir, then the closing stages; the data files of the stages that train are
    read (every one parses and holds rows).

    Args:
        cfg, stages: from :func:`resolve_config`.
        stage: the one training stage run with ``--stage``.
        refuse_stale: raise :class:`StaleStagesError` when a finished stage is
            stale (a run without ``--rerun-stale``); else plan to train it again.
        compared: the config finished stages are compared with (default ``cfg``).
    """
    stale = stale_stages(cfg if compared is None else compared, stages, dependencies,
                         made_by=_made_by)
    if stale and refuse_stale:
        raise StaleStagesError(stale, cfg.work_dir)
    steps = []
    for name in stages:
        where = stage_work_dir(cfg, name)
        state = (STALE if name in stale else NEW if read_manifest(where, name) is None
                 else REUSED if where != cfg.work_dir else FINISHED)
        steps.append(StagePlan(name, True, state, where, stale.get(name)))
    check_data_files(cfg, sorted({cfg[s.name].data for s in steps if s.runs}))
    steps += [StagePlan(name, False, NEW, cfg.work_dir) for name in closing_stages(cfg, stage)]
    return RunPlan(cfg, steps)


def _made_by(cfg: Config, stage: str) -> dict:
    """The stage's resolved config as its manifest records it (the images are
    compared on --resume, not before skipping a finished stage)."""
    return result_config(cfg, stage, launched_processes(cfg), images=False)


def plan_run(cfg: Config, stage: Optional[str] = None) -> RunPlan:
    """The plan ``--dry-run`` prints: :func:`resolve_config`, then
    :func:`plan_stages` with stale stages planned to train again (finished
    stages compared with the synthetic data where it already exists: nothing
    is written)."""
    cfg, stages = resolve_config(cfg, stage)
    with_data = copy.deepcopy(cfg)
    prepare_synthetic_data(with_data, create=False)
    return plan_stages(cfg, stages, stage, refuse_stale=False, compared=with_data)


def prepare_synthetic_data(cfg: Config, create: bool = True) -> None:
    """Make the embedded default's data on first use and point the datasets
    that name no files of their own at it: a dataset given ``data_files``
    keeps them (your data wins over ``synthetic_data``), as does an
    ``eval.data``. Which data each dataset reads is logged. ``create=False``
    (the dry run): only where the data already exists."""
    spec = cfg.get('synthetic_data')
    if not spec:
        return
    paths = make_synthetic_data(**spec) if create else synthetic_data_paths(**spec)
    if paths is None:
        return
    for data_key, files in (('caption_data', 'captions'), ('instruct_data', 'instructions')):
        for name, source in data_sources(cfg[data_key]).items():
            if source.get('data_files'):
                if create:
                    print_log(f'{source_name(data_key, name)}: your data_files '
                              f'{as_list(source.data_files)} (synthetic_data fills only '
                              'datasets without data_files)', logger='current')
                continue
            source.update(data_files=[paths[files]], image_folder=paths['image_folder'])
    for name in closing_stage_names():
        build_stage(name).use_synthetic_data(cfg, paths)
