"""``curves.png`` of a stage: its loss and CMO weight statistics over the
iterations, read from mmengine's scalar log (``LocalVisBackend``'s
``<timestamp>/vis_data/scalars.json``, one per run of the stage: a resumed
stage has several). matplotlib is optional (``pip install matplotlib``);
without it the stage logs a one-line note and draws nothing."""
import glob
import io
import json
import logging
import os.path as osp
from typing import Dict, Optional

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log

from dpa.artifacts import atomic_write

CURVES_FILE = 'curves.png'
_noted_missing_matplotlib = []
# The CMO panel: the weight mean and the share of tokens at each clamp bound.
CMO_KEYS = (('cmo_w_mean', 'weight mean'), ('cmo_at_min', 'at delta_min'),
            ('cmo_at_max', 'at delta_max'))


def read_scalar_log(stage_dir: str) -> Dict[int, dict]:
    """Every logged record of a stage by iteration; where a resumed run logged
    an iteration again, its record wins (runs are read in timestamp order).

    Args:
        stage_dir: the stage's work dir (``<work_dir>/<stage>``).
    """
    records = {}
    for path in sorted(glob.glob(osp.join(stage_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # blank, or cut short by a kill or a full disk
                records[int(record['step'])] = record
    return dict(sorted(records.items()))


def plot_curves(stage_dir: str, title: str = '') -> Optional[str]:
    """Draw ``curves.png`` in ``stage_dir``; return its path, or None when
    there is nothing logged or matplotlib is not installed (then say so)."""
    records = read_scalar_log(stage_dir)
    if not records:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _noted_missing_matplotlib:  # one note per run, not one per stage
            print_log(f'no {CURVES_FILE}: matplotlib is not installed (pip install matplotlib)',
                      logger='current', level=logging.WARNING)
            _noted_missing_matplotlib.append(True)
        return None
    steps = list(records)
    has_cmo = any('cmo_w_mean' in r for r in records.values())
    figure = Figure(figsize=(7, 5.5 if has_cmo else 3))
    axes = figure.subplots(2 if has_cmo else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(steps, [records[s].get('loss') for s in steps], color='#4477aa')
    axes[0].set(ylabel='loss', title=title)
    if has_cmo:
        for key, label in CMO_KEYS:
            axes[1].plot(steps, [records[s].get(key) for s in steps], label=label)
        axes[1].set(ylabel='CMO token weights')
        axes[1].legend(fontsize='small')
    axes[-1].set(xlabel='iteration')
    for ax in axes:
        ax.grid(alpha=0.3)
    figure.tight_layout()
    path = osp.join(stage_dir, CURVES_FILE)
    image = io.BytesIO()
    figure.savefig(image, format='png', dpi=100)
    atomic_write(image.getvalue(), path)  # a full disk leaves no truncated png
    return path


class CurvesHook(Hook):
    """Draws the stage's ``curves.png`` when training ends (main process),
    after the last iteration has been logged.

    Args:
        stage: the stage's name, the plot's title.
    """
    priority = 'VERY_LOW'

    def __init__(self, stage: str):
        self.stage = stage

    def after_train(self, runner):
        if is_main_process():
            plot_curves(runner.work_dir, title=self.stage)
