"""The run summary ``tools/train.py`` prints: a few lines per stage, each
stage's own (:meth:`dpa.engine.stages.Stage.summary_lines`)."""
import os.path as osp
from typing import List

from dpa.engine.curves import CURVES_FILE
from dpa.engine.hooks import SKIPPED_FILE
from dpa.engine.stage_times import seconds_line
from dpa.engine.stages import build_stage


def format_summary(manifests: List[dict]) -> str:
    """The summary of a run from the manifests :func:`run_pipeline` returned."""
    lines = ['DPA pipeline summary']
    for m in manifests:
        lines += build_stage(m['stage']).summary_lines(m)
    return '\n'.join(lines)


def training_summary_lines(m: dict) -> List[str]:
    """A training stage's lines: trained or skipped, the loss, CMO's weights,
    skipped rows, the artifact and the curves."""
    status = ('trained' if not m.get('skipped') else
              f"reused from {m['reused_from']}" if m.get('reused_from') else
              'skipped (artifact exists)')
    lines = [f"  {m['stage']:<8} {status}: {m['iterations']} iterations, "
             f"loss {m['first_loss']:.4f} -> {m['last_loss']:.4f}"]
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
    if not m.get('skipped'):
        lines += seconds_line(m.get('seconds'))
    lines.append(f"           {m['artifact_kind']}: {m['artifact']}")
    curves = osp.join(osp.dirname(m['artifact']), CURVES_FILE)
    if osp.isfile(curves):
        lines.append(f'           curves: {curves}')
    for note in m.get('notes', []):
        lines.append(f'           note: {note}')
    return lines
