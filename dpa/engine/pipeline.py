"""The DPA pipeline: check the config, plan the stages, and run each one.

A pipeline config holds the model parts (``llm``, ``tokenizer``,
``vision_tower``, ``image_processor``, ``model``), the data (``caption_data``,
``instruct_data``), one recipe per stage (``proxy``, ``align``, ``finetune``),
the optional closing stages (``stages = [..., 'eval']``) and the runtime.

:func:`run_pipeline` is the whole recipe:

1. check everything that needs no model (:func:`dpa.engine.preflight.resolve_config`);
2. make the synthetic data if the config uses it;
3. under the work dir's lock, plan the stages
   (:func:`dpa.engine.preflight.plan_stages`, what ``--dry-run`` prints);
4. run each stage of the plan: a training stage (:class:`TrainingStage`)
   builds an mmengine Runner from :func:`dpa.engine.stage_config.stage_runner_config`
   in ``work_dir/<stage>``, trains, and its :class:`~dpa.engine.hooks.DPAHook`
   writes the artifact and, last, the manifest the next stage reads.
"""
import logging
import time
from dataclasses import dataclass
from typing import List, Optional

from mmengine.config import Config
from mmengine.dist import barrier, is_main_process
from mmengine.logging import print_log

from dpa.artifacts import read_manifest, stage_work_dir, write_manifest
from dpa.engine.checkpoint import latest_complete_checkpoint
from dpa.engine.compile import apply_gpu_switches
from dpa.engine.config_guard import prepare_stage_start, record_config_changes
from dpa.engine.console import (ConsoleProgressHook, announce, build_with_console, log_file,
                                stage_console, stage_start_line)
from dpa.engine.curves import CurvesHook
from dpa.engine.distributed import build_runner, check_launcher, init_cpu_process_group
from dpa.engine.dry_run import training_stage_lines
from dpa.engine.interrupts import (TrainingInterrupted, graceful_interrupts, requested_signal,
                                   stop_dataloader_workers)
from dpa.engine.optim import NonFiniteLossError
from dpa.engine.preflight import (StagePlan, plan_stages, prepare_synthetic_data,  # noqa: F401
                                  resolve_config)
from dpa.engine.stage_config import (STAGES, dependencies, gradient_accumulation,
                                     launched_processes, stage_runner_config)
from dpa.engine.stage_times import StageClock, time_runner
from dpa.engine.stages import Stage, build_stage
from dpa.engine.staleness import input_checksums, set_aside
from dpa.engine.summary import training_summary_lines
from dpa.engine.workdir import work_dir_lock
from dpa.registry import PIPELINE_STAGES


@dataclass
class RunOptions:
    """How this run treats its stages (the command line's switches)."""
    resume: bool = False
    allow_config_change: bool = False
    verbose: bool = False
    # Only the first stage that trains in a run may resume a checkpoint.
    first_unfinished: bool = True


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
    check_launcher(cfg.get('launcher', 'none'))
    init_cpu_process_group(cfg)
    prepare_synthetic_data(cfg)
    options = RunOptions(resume, allow_config_change, verbose)
    with work_dir_lock(cfg.work_dir, cfg.get('launcher', 'none')), graceful_interrupts():
        plan = plan_stages(cfg, stages, stage, refuse_stale=not rerun_stale)
        if plan.stale and is_main_process():
            for name, folder in set_aside(cfg.work_dir, list(plan.stale)).items():
                print_log(f'[{name}] stale ({plan.stale[name]}): moved to {folder}, training '
                          'it again', logger='current', level=logging.WARNING)
        barrier()
        return [build_stage(step.name).run(cfg, step, options) for step in plan.stages]


@PIPELINE_STAGES.register_module(name=list(STAGES))
class TrainingStage(Stage):
    """``proxy``, ``align`` and ``finetune``: one mmengine Runner each."""
    trains = True

    def run(self, cfg: Config, step: StagePlan, options: RunOptions) -> dict:
        name = self.name
        if not step.runs:
            manifest = dict(read_manifest(step.work_dir, name), skipped=True)
            if step.work_dir != cfg.work_dir:
                manifest['reused_from'] = step.work_dir
            return manifest
        if requested_signal():
            raise TrainingInterrupted(name, requested_signal(), 0, None)
        inputs = input_checksums({role: read_manifest(stage_work_dir(cfg, previous), previous)
                                  for role, previous in dependencies(cfg, name).items()})
        resumes, changes, made_by = prepare_stage_start(cfg, name, options.resume,
                                                        options.first_unfinished,
                                                        launched_processes(cfg),
                                                        options.allow_config_change, inputs)
        options.first_unfinished = False
        seconds = train_stage(cfg, name, resumes, options.verbose, made_by)
        record_config_changes(cfg.work_dir, name, changes)
        record_stage_seconds(cfg.work_dir, name, seconds)
        return dict(read_manifest(cfg.work_dir, name), skipped=False)

    def describe(self, cfg: Config, step: StagePlan) -> List[str]:
        return training_stage_lines(cfg, step)

    def summary_lines(self, manifest: dict) -> List[str]:
        return training_summary_lines(manifest)


def train_stage(cfg: Config, stage: str, resume: bool, verbose: bool = False,
                made_by: Optional[dict] = None) -> dict:
    """Build and run one stage's Runner; the console shows a start line and a
    progress bar, mmengine's records go to its log file (``verbose``: to the
    console too; :mod:`dpa.engine.console`). ``made_by``: the stage's resolved
    config, recorded in its manifest. Returns where the time went
    (:mod:`dpa.engine.stage_times`)."""
    accumulation = gradient_accumulation(cfg, stage)
    with stage_console(verbose, accumulation):
        return _run_stage(cfg, stage, resume, verbose, accumulation, made_by)


def record_stage_seconds(work_dir: str, stage: str, seconds: dict) -> None:
    """Add where the stage's time went to its manifest (main process)."""
    if not is_main_process():
        return
    manifest = read_manifest(work_dir, stage)
    if manifest is not None:
        write_manifest(work_dir, stage, dict(manifest, seconds=seconds))


def _run_stage(cfg: Config, stage: str, resume: bool, verbose: bool, accumulation: int,
               made_by: Optional[dict]) -> dict:
    recipe = cfg[stage]
    clock = StageClock()
    start = time.perf_counter()
    runner = build_with_console(
        build_runner, stage_runner_config(cfg, stage, resume=resume, made_by=made_by), verbose)
    apply_gpu_switches(cfg, runner)
    announce(runner, stage_start_line(
        stage, len(runner.train_dataloader.dataset), recipe.batch_size, launched_processes(cfg),
        accumulation, recipe.global_batch_size,
        max(1, len(runner.train_dataloader) * recipe.max_epochs), log_file(runner)), verbose)
    if not verbose:
        interval = (cfg.get('default_hooks') or {}).get('logger', {}).get('interval', 10)
        runner.register_hook(ConsoleProgressHook(stage, interval))
    runner.register_hook(CurvesHook(stage))
    time_runner(runner, clock)
    clock.add('setup', time.perf_counter() - start)
    try:
        start = time.perf_counter()
        runner.train()
        return clock.stage_seconds(time.perf_counter() - start)
    except NonFiniteLossError as err:
        last_good = latest_complete_checkpoint(runner.work_dir)
        raise NonFiniteLossError(
            f'[{stage}] {err} at iteration {runner.iter + 1}; last good checkpoint: '
            f'{last_good or "none yet"}. Lower the learning rate or fix the data, then rerun '
            'with --resume; or set skip_nonfinite_steps=True to skip such steps') from None
    finally:
        stop_dataloader_workers(runner)
