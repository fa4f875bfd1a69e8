"""``tools/train.py CONFIG --dry-run``: the plan of a run, without loading a model.

The plan is the run's own (:func:`dpa.engine.preflight.plan_run`: the same
checks, in the same order, and the same reading of the work dir), and each
stage describes itself in it (:meth:`dpa.engine.stages.Stage.describe`); a
training stage's lines are made here: data and row counts, batch arithmetic,
iterations, trainable parts, loss, strategy and precision, and the artifact
it writes with what it is made from. Nothing is written.
"""
import math
import os.path as osp
from typing import List, Optional, Tuple

from mmengine.config import Config

from dpa.artifacts import stage_work_dir
from dpa.datasets.llava import read_rows
from dpa.datasets.mixture import as_list, data_sources
from dpa.engine.memory_plan import GB, UnknownArchitecture, format_count, plan_stage
from dpa.engine.preflight import STALE, StagePlan, plan_run
from dpa.engine.schedule import warmup_problem
from dpa.engine.stage_config import (ARTIFACTS, dependencies, gradient_accumulation,
                                     launched_processes, stage_lora, stage_trainable)
from dpa.engine.stages import build_stage
from dpa.errors import ConfigError
from dpa.models.export import planned_export_blocker

SYNTHETIC_ROWS = {'caption_data': 'num_captions', 'instruct_data': 'num_instructions'}
ARTIFACT_FORMATS = {'adapter': 'PEFT LoRA adapter', 'projector': 'projector.safetensors'}


def _final_model_format(cfg: Config) -> str:
    """What the final stage writes for this config's family and projector."""
    blocker = planned_export_blocker(cfg.llm, cfg.model.get('projector', {}).get('type'))
    if blocker is not None:
        return (f'native model only, no transformers export ({blocker}; lmms-eval scores it '
                'with the project\'s dpa model)')
    export = 'LLaVA-NeXT' if cfg.get('anyres') else 'LLaVA'
    return f'native model + transformers {export} export (hf_llava/)'


def _part(spec) -> str:
    """A model part in a few words: its checkpoint, or the HF config it is built from."""
    if not spec:
        return 'none'
    if spec.get('pretrained'):
        return spec['pretrained']
    config = spec.get('config') or {}
    size = config.get('hidden_size')
    return f"random {config.get('model_type', spec.get('type'))}" + (
        f' (hidden size {size})' if size else '')


def _data_lines(cfg: Config, data_key: str) -> Tuple[List[str], int]:
    """Lines describing a stage's data, and its samples per epoch."""
    synthetic = cfg.get('synthetic_data')
    lines, samples = [], 0
    for name, source in data_sources(cfg[data_key]).items():
        ratio = source.get('ratio', 1.0)
        if synthetic and not source.get('data_files'):  # it reads the synthetic file
            rows = synthetic.get(SYNTHETIC_ROWS[data_key])
            lines.append(f'synthetic {data_key}: {rows} rows, made under {synthetic["root"]} on '
                         'first run')
        else:
            rows = 0
            for path in as_list(source.data_files):
                try:
                    count = len(read_rows(path, problems=[]))
                except ValueError as err:
                    raise ConfigError(f'{data_key}: {err}') from None
                rows += count
                lines.append(f'{path}: {count} rows')
        if name != 'data':
            lines.append(f'  source {name}: ratio {ratio} -> {round(ratio * rows)} samples')
        samples += round(ratio * rows)
    return lines, samples


def _strategy(cfg: Config) -> str:
    strategy = cfg.get('strategy')
    processes = launched_processes(cfg)
    if strategy:
        return f"{strategy['type']} on {processes} process(es)"
    return f'DDP on {processes} processes' if processes > 1 else 'one process'


def _trainable_lines(cfg: Config, stage: str, processes: int) -> List[str]:
    """What the stage trains, how many parameters, and the memory plan's
    estimate per GPU (:mod:`dpa.engine.memory_plan`; no weights loaded)."""
    trainable = stage_trainable(cfg, stage)
    lora = stage_lora(cfg, stage) if 'lora' in trainable else None
    line = f"  trainable: {', '.join(trainable)}"
    if lora is not None:
        modules = lora.get('target_modules') or 'PEFT default'
        line += (f" (LoRA r={lora.get('r', 8)}, alpha={lora.get('lora_alpha', 8)}, dropout "
                 f"{lora.get('lora_dropout', 0.0)} on {modules} modules)")
    try:
        plan = plan_stage(cfg, stage, processes, trainable)
    except Exception as err:  # noqa: BLE001  an estimate never stops the plan
        reason = err if isinstance(err, UnknownArchitecture) else f'{type(err).__name__}: {err}'
        return [line, f'  memory per process: no estimate ({reason})']
    line += (f": {format_count(plan['trainable_parameters'])} parameters "
             f"(LLM {format_count(plan['llm_parameters'])})")
    unit, size = ('GB', GB) if plan['total'] >= GB / 10 else ('MB', 2 ** 20)
    parts = ' + '.join(f'{name} {plan[key] / size:.1f}' for name, key in (
        ('weights', 'weights'), ('gradients', 'gradients'), ('optimizer', 'optimizer'),
        ('activations', 'activations')))
    return [line, (f"  memory per process (estimate, tools/plan_memory.py): "
                   f"{plan['total'] / size:.1f} {unit} = {parts} "
                   f"({'with' if plan['checkpointing'] else 'without'} activation "
                   'checkpointing)')]


def training_stage_lines(cfg: Config, step: StagePlan) -> List[str]:
    """A training stage's lines of the plan (``step``: its plan)."""
    stage = step.name
    recipe = cfg[stage]
    lines = []
    if step.state == STALE:
        lines.append(f'  finished but stale ({step.reason}): refused, or trained again with '
                     '--rerun-stale')
    elif not step.runs:
        lines.append(f'  already finished in {step.work_dir}: skipped')
    data_lines, samples = _data_lines(cfg, recipe.data)
    lines += [f'  data: {line}' for line in data_lines]
    processes = launched_processes(cfg)
    accumulation = gradient_accumulation(cfg, stage)
    per_process = math.ceil(samples / processes)
    iterations = max(1, math.ceil(per_process / recipe.batch_size) * recipe.max_epochs)
    lines.append(f'  batch {recipe.batch_size} x {processes} processes x {accumulation} '
                 f'accumulation = global batch {recipe.global_batch_size}')
    if recipe.get('pack'):
        lines.append(f'  iterations: packed rows (known after tokenising); at most {iterations} '
                     f'({recipe.max_epochs} epoch(s) of {samples} samples)')
    else:
        steps = math.ceil(iterations / accumulation)
        lines.append(f'  iterations: {iterations} ({recipe.max_epochs} epoch(s) of {samples} '
                     f'samples, {steps} optimizer steps)')
        problem = warmup_problem(steps, recipe.warmup_ratio)
        if problem:
            lines.append(f'  warning: {problem}')
    lines += _trainable_lines(cfg, stage, processes)
    loss = dict(recipe.get('loss', {}))
    mode = loss.pop('mode', 'vanilla')
    lines.append(f'  loss: {mode}' + (f" ({', '.join(f'{k}={v}' for k, v in loss.items())})"
                                      if loss else ''))
    optim = recipe.optim_wrapper.get('optimizer', {})
    projector_lr = recipe.get('projector_lr')
    lines.append(f"  optimizer: {optim.get('type')} lr {optim.get('lr')}"
                 + (f' (projector {projector_lr})' if projector_lr is not None else '')
                 + f", warm-up {recipe.warmup_ratio:.0%}, max length {recipe.max_length}")
    precision = cfg.get('mixed_precision') or 'float32'
    lines.append(f"  strategy: {_strategy(cfg)}; precision: {precision} (trainable weights "
                 f"{cfg.get('trainable_dtype') or 'as loaded'})")
    made_from = [f'llm {_part(cfg.llm)}']
    if stage != 'proxy':
        made_from.append(f'vision tower {_part(cfg.get("vision_tower"))}')
    for role, previous in dependencies(cfg, stage).items():
        made_from.append(f'{role} of stage {previous} '
                         f'({osp.join(stage_work_dir(cfg, previous), previous, "artifact")})')
    if step.runs:
        artifact = ARTIFACTS[stage]
        written = _final_model_format(cfg) if artifact == 'model' else ARTIFACT_FORMATS[artifact]
        lines.append(f'  writes: {written} in {osp.join(cfg.work_dir, stage, "artifact")}')
    lines.append(f"  made from: {'; '.join(made_from)}")
    return lines


def dry_run(cfg: Config, stage: Optional[str] = None) -> str:
    """The plan of ``cfg``'s run (or of one stage) as text; raises
    :class:`ConfigError` at the first problem, as the run would.

    Args:
        cfg: a pipeline config with its ``work_dir`` set.
        stage: plan this training stage only, as ``--stage`` runs it.
    """
    plan = plan_run(cfg, stage)
    lines = [f"Plan of {len(plan.stages)} stage(s) in {plan.cfg.work_dir} "
             "(dry run: no model loaded)"]
    for step in plan.stages:
        lines.append(f'[{step.name}]')
        lines += build_stage(step.name).describe(plan.cfg, step)
    return '\n'.join(lines)
