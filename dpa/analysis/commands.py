"""What ``tools/analyze_relevance.py`` and ``tools/analyze_prior.py`` run."""
import copy
import json
import os
import os.path as osp
from typing import Optional, Sequence

from mmengine.config import Config

from dpa.analysis.models import build_analysis_model
from dpa.analysis.plots import matplotlib_available, plot_relevance
from dpa.analysis.relevance import (analysis_rows, summary, token_records, write_html,
                                    write_jsonl)
from dpa.engine.config_file import load_config
from dpa.engine.paths import fill_path_variables
from dpa.engine.pipeline import prepare_synthetic_data
from dpa.engine.stage_config import stage_dataset_config
from dpa.engine.standin import make_tiny
from dpa.models.losses import DEFAULT_CLAMP, VisualRelevanceLoss
from dpa.registry import DATASETS


def load_run_config(path: str, cfg_options: Optional[dict] = None,
                    work_dir: Optional[str] = None) -> Config:
    """A config file with its ``--cfg-options`` and the work dir that
    ``tools/train.py`` gives it (default ``work_dirs/<config name>``)."""
    cfg = load_config(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.work_dir = work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def resolve_config(cfg: Config) -> Config:
    """The config as the pipeline runs it: stand-ins, paths, synthetic data."""
    if cfg.get('tiny_standin'):
        cfg = make_tiny(cfg)
    fill_path_variables(cfg)
    prepare_synthetic_data(cfg)
    return cfg


def analysis_dataset(cfg: Config, stage: str, data: Optional[str] = None,
                     image_folder: Optional[str] = None):
    """The stage's dataset, or ``data`` tokenised with the stage's template."""
    dataset = stage_dataset_config(cfg, stage)
    if data is not None:
        for key in ('type', 'sources', 'seed'):
            dataset.pop(key, None)
        dataset.update(type='LLaVADataset', data_files=[data],
                       image_folder=image_folder or '')
    elif image_folder is not None:
        raise ValueError('--image-folder goes with --data')
    return DATASETS.build(dataset)


def analyze_relevance(cfg: Config, stage: str, models: Sequence[str], num: int, out_dir: str,
                      data: Optional[str] = None, image_folder: Optional[str] = None) -> dict:
    """Write ``tokens.jsonl``, ``relevance.html``, the PNG plots (when
    matplotlib is installed) and ``summary.json`` to ``out_dir``; return the
    summary."""
    if len(set(models)) != len(models) or not 1 <= len(models) <= 2:
        raise ValueError(f'--model takes one or two different values, got {list(models)}')
    cfg = resolve_config(copy.deepcopy(cfg))
    loss = VisualRelevanceLoss(**cfg[stage].get('loss', {}))
    clamp = loss.clamp or DEFAULT_CLAMP['cmo']
    dataset = analysis_dataset(cfg, stage, data, image_folder)
    samples, skipped = analysis_rows(dataset, num)
    if not samples:
        raise ValueError(f'no usable row among the {len(dataset)} rows of the data '
                         f'({len(skipped)} bad, e.g. {skipped[:2]})')
    os.makedirs(out_dir, exist_ok=True)
    records, descriptions = {}, {}
    for which in models:
        model, descriptions[which] = build_analysis_model(cfg, stage, which)
        records[which] = token_records(model, loss, samples, dataset.tokenizer, which)
        del model
    everything = [r for which in models for r in records[which]]
    write_jsonl(everything, osp.join(out_dir, 'tokens.jsonl'))
    write_html(everything, osp.join(out_dir, 'relevance.html'), clamp, descriptions,
               colour_by='delta' if loss.mode == 'vanilla' else 'weight')
    plots = (plot_relevance(records, clamp, out_dir) if matplotlib_available() else [])
    result = dict(stage=stage, loss=dict(mode=loss.mode, clamp=list(clamp), window=loss.window,
                                         scope=loss.scope),
                  samples=len(samples), skipped_rows=skipped,
                  models={which: dict(description=descriptions[which],
                                      **summary(records[which], clamp)) for which in models},
                  files=['tokens.jsonl', 'relevance.html'] + [osp.basename(p) for p in plots])
    if not plots:
        result['note'] = 'no PNG plots: matplotlib is not installed (pip install matplotlib)'
    with open(osp.join(out_dir, 'summary.json'), 'w') as f:
        json.dump(result, f, indent=2)
    return result
