"""The optional fourth pipeline stage, ``eval``: the final model scored on an
evaluation file, its metrics in the stage's manifest and the run summary.

    stages = ['proxy', 'align', 'finetune', 'eval']
    eval = dict(data='/data/eval.jsonl', image_folder='/data/images', batch_size=8)

With ``synthetic_data`` and no ``eval.data``, the synthetic held-out split is
used. Like a training stage it is skipped on re-run, unless what it scored
has changed: the final model (trained again since), the data file (another
one, or the same one edited: its sha256) or the settings (``eval_settings`` in
its manifest). The final model may be another run's (``finetune.from_work_dir``);
it is read through :func:`dpa.artifacts.read_current_manifest`, so a stale one
is refused. The stage is registered in
:data:`dpa.registry.PIPELINE_STAGES` (:class:`EvalStage`): the engine runs it
by name.
"""
import json
import os.path as osp
import time
from typing import List, Optional

from mmengine.dist import barrier, is_main_process

from dpa.artifacts import (checksums_digest, read_current_manifest, read_manifest, sha256_of,
                           stage_work_dir, write_artifact_dir, write_manifest)
from dpa.datasets.llava import read_rows
from dpa.engine.console import stage_console
from dpa.engine.interrupts import TrainingInterrupted, requested_signal
from dpa.engine.stage_times import seconds_line
from dpa.engine.stages import Stage
from dpa.errors import ConfigError
from dpa.evaluation.data import EvalDataError
from dpa.evaluation.evaluator import METRICS_FILE, BadRowsError, EvaluationInterrupted, evaluate
from dpa.evaluation.models import ModelLoadError, check_device
from dpa.models.export import NATIVE_CONFIG
from dpa.registry import PIPELINE_STAGES

EVAL_STAGE = 'eval'
FINAL_STAGE = 'finetune'
EVAL_KEYS = ('data', 'image_folder', 'batch_size', 'device', 'skip_bad_rows')
ARTIFACT_KIND = 'metrics'


def check_eval_config(cfg, stages: List[str]) -> None:
    """The ``eval`` settings, checked before any model is loaded.

    Args:
        cfg: the pipeline config.
        stages: the training stages this run trains.
    """
    spec = cfg.get(EVAL_STAGE)
    if not isinstance(spec, dict):
        raise ConfigError(f"stages lists {EVAL_STAGE!r} but the config has no "
                          "`eval = dict(data=FILE, image_folder=DIR)`")
    unknown = sorted(set(spec) - set(EVAL_KEYS))
    if unknown:
        raise ConfigError(f'eval: unknown key(s) {unknown}; known: {list(EVAL_KEYS)}')
    batch_size = spec.get('batch_size', 8)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f'eval.batch_size must be a positive integer, got {batch_size!r}')
    if spec.get('device'):
        try:
            check_device(str(spec['device']))
        except ModelLoadError as err:
            raise ConfigError(f'eval.device: {err}') from None
    if not spec.get('data') and not cfg.get('synthetic_data'):
        raise ConfigError('eval.data is not set: point it at a json/jsonl file of evaluation '
                          'rows (see docs/evaluate.md)')
    if spec.get('data') and not osp.isfile(spec['data']):
        raise ConfigError(f"eval.data: {spec['data']!r} does not exist")
    if spec.get('data'):
        # Parsed now, not after training: bad rows are the evaluator's to report.
        try:
            rows = read_rows(spec['data'], [])
        except (OSError, ValueError) as err:
            raise ConfigError(f'eval.data: {err}') from None
        if not rows:
            raise ConfigError(f"eval.data: {spec['data']} holds no rows")
    folder = spec.get('image_folder')
    if folder and spec.get('data') and not osp.isdir(folder):
        raise ConfigError(f'eval.image_folder: {folder!r} is not a directory')
    final_dir = stage_work_dir(cfg, FINAL_STAGE)
    if FINAL_STAGE not in stages and read_manifest(final_dir, FINAL_STAGE) is None:
        raise ConfigError(f'stage {EVAL_STAGE!r} scores the final model of stage '
                          f"{FINAL_STAGE!r}, but {osp.join(final_dir, FINAL_STAGE)} has no "
                          f'manifest: run `--stage {FINAL_STAGE}` first (same --work-dir)')


def point_at_synthetic_split(cfg, paths: dict) -> None:
    """Without its own ``eval.data``, the eval stage reads the synthetic split."""
    spec = cfg.get(EVAL_STAGE)
    if isinstance(spec, dict) and not spec.get('data'):
        spec.update(data=paths['eval'], image_folder=paths['image_folder'])


def eval_settings(cfg, final: dict) -> dict:
    """What the scores depend on: the model (its files' checksum digest), the
    data file and its sha256, the image folder, every setting of ``eval`` but
    the device, and the images' preprocessing. The stage's skip key, with the
    model's ``finished_at``; a manifest of an older version, without it, is
    scored again."""
    spec = cfg[EVAL_STAGE]
    settings = {key: spec.get(key) for key in EVAL_KEYS if key not in ('data', 'device')}
    settings.update(data=osp.abspath(spec['data']), data_sha256=sha256_of(spec['data']),
                    image_folder=osp.abspath(spec.get('image_folder') or ''),
                    batch_size=spec.get('batch_size', 8),
                    skip_bad_rows=spec.get('skip_bad_rows', False),
                    pad_to_square=_pad_to_square(cfg, final['artifact']),
                    model_checksums=checksums_digest(final))
    return settings


def run_eval_stage(cfg) -> dict:
    """Score the final model (rank 0) and write the stage's manifest; return
    it, with ``skipped`` True when an up-to-date one existed."""
    work_dir = cfg.work_dir
    final_dir = stage_work_dir(cfg, FINAL_STAGE)
    final = read_manifest(final_dir, FINAL_STAGE)
    settings = eval_settings(cfg, final)
    manifest = read_manifest(work_dir, EVAL_STAGE)
    if (manifest is not None and manifest.get('model_finished_at') == final['finished_at']
            and manifest.get('eval_settings') == settings):
        return dict(manifest, skipped=True)
    # Checked here, once, before scoring: the scores must be the model's training wrote,
    # made from the earlier artifacts the work dir holds.
    read_current_manifest(final_dir, FINAL_STAGE, verify=True)
    if requested_signal():
        raise TrainingInterrupted(EVAL_STAGE, requested_signal(), 0, None)
    if is_main_process():
        spec = cfg[EVAL_STAGE]
        target = osp.join(work_dir, EVAL_STAGE, 'artifact')
        results = {}

        def write(tmp_dir):
            results.update(evaluate(
                final['artifact'], spec['data'], spec.get('image_folder') or '', tmp_dir,
                batch_size=spec.get('batch_size', 8), device=spec.get('device'),
                skip_bad_rows=spec.get('skip_bad_rows', False),
                pad_to_square=_pad_to_square(cfg, final['artifact']), show_progress=False,
                verify=False, interrupted=requested_signal))

        start = time.perf_counter()
        try:
            write_artifact_dir(target, write)
        except (BadRowsError, EvalDataError) as err:
            raise ConfigError(f'eval.data: {err}') from None
        except EvaluationInterrupted as err:
            # Nothing to save: a re-run scores the model again from the start.
            raise TrainingInterrupted(EVAL_STAGE, err.signum, 0, None) from None
        # The manifest keys every stage has; no training happens here.
        write_manifest(work_dir, EVAL_STAGE, dict(
            artifact_kind=ARTIFACT_KIND, artifact=osp.abspath(target),
            made_from=dict(model=final['artifact'], data=osp.abspath(spec['data'])),
            model_finished_at=final['finished_at'], eval_settings=settings, iterations=0,
            first_loss=None,
            last_loss=None, metrics=summary_metrics(results),
            seconds=dict(total=round(time.perf_counter() - start, 3))))
    barrier()
    return dict(read_manifest(work_dir, EVAL_STAGE), skipped=False)


def _pad_to_square(cfg, model_dir: str) -> Optional[bool]:
    """None (what the final model's dpa_model.json records, written from the
    finetune stage's own preprocessing) when it records it; else the config's."""
    with open(osp.join(model_dir, NATIVE_CONFIG)) as f:
        recorded = 'pad_to_square' in json.load(f)
    return None if recorded else cfg.get('pad_to_square', False)


def summary_metrics(metrics: dict) -> dict:
    keys = ('accuracy', 'n', 'chance', 'per_type', 'skipped_rows', 'no_image')
    return {k: metrics[k] for k in keys if k in metrics}


def _percent(value) -> str:
    return '-' if value is None else f'{value:.1%}'


def eval_summary_lines(manifest: dict) -> List[str]:
    """The eval stage's lines of the run summary, the accuracy last."""
    m = manifest['metrics']
    status = 'skipped (scores exist)' if manifest.get('skipped') else 'evaluated'
    lines = [f"  {EVAL_STAGE:<8} {status}: {m['n']} rows of {manifest['made_from']['data']}"]
    if not manifest.get('skipped'):
        lines += seconds_line(manifest.get('seconds'))
    lines += [f"           {ARTIFACT_KIND}: {osp.join(manifest['artifact'], METRICS_FILE)}"]
    if m.get('skipped_rows'):
        lines.append(f"           {m['skipped_rows']} bad rows skipped")
    if m.get('per_type'):
        lines.append('           per type: ' + ', '.join(
            f"{t} {_percent(v['accuracy'])}" for t, v in m['per_type'].items()))
    accuracy = f"           final model accuracy {_percent(m['accuracy'])}"
    if m.get('chance') is not None:
        accuracy += f" (chance {_percent(m['chance'])})"
    if m.get('no_image'):
        accuracy += f"; without the pictures {_percent(m['no_image']['accuracy'])}"
    return lines + [accuracy]


@PIPELINE_STAGES.register_module(name=EVAL_STAGE)
class EvalStage(Stage):
    """The pipeline's ``eval`` stage (see the module's docstring)."""

    def check(self, cfg, training_stages: List[str]) -> None:
        check_eval_config(cfg, training_stages)

    def use_synthetic_data(self, cfg, paths: dict) -> None:
        point_at_synthetic_split(cfg, paths)

    def describe(self, cfg, step) -> List[str]:
        data = cfg[EVAL_STAGE].get('data') or 'the synthetic evaluation split'
        return [f'  scores the final model on {data}; writes metrics in '
                f'{osp.join(cfg.work_dir, EVAL_STAGE, "artifact")}']

    def run(self, cfg, step, options) -> dict:
        if requested_signal():
            raise TrainingInterrupted(EVAL_STAGE, requested_signal(), 0, None)
        with stage_console(options.verbose):
            return run_eval_stage(cfg)

    def summary_lines(self, manifest: dict) -> List[str]:
        return eval_summary_lines(manifest)
