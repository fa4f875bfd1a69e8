"""PNG plots of relevance records (matplotlib, an optional dependency:
``pip install matplotlib``)."""
import os.path as osp
from typing import Dict, List, Sequence

from dpa.analysis.relevance import word_weights


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_relevance(records_by_model: Dict[str, Sequence[dict]], clamp, out_dir: str) -> List[str]:
    """The ``delta`` histogram with the clamp bounds and the mean weight of the
    most frequent words, per model; with two models, their words side by side.
    Returns the files written."""
    plt = _pyplot()
    written = []
    for name, records in records_by_model.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist([r['delta'] for r in records], bins=50, color='#4477aa')
        for bound, label in zip(clamp, ('delta_min', 'delta_max')):
            ax.axvline(bound, color='#cc3311', linestyle='--', label=f'{label} = {bound}')
        ax.set(xlabel='p(y|image, text) - p(y|text)', ylabel='target tokens',
               title=f'{name}: {len(records)} tokens')
        ax.legend()
        written.append(_save(fig, plt, osp.join(out_dir, f'delta_hist_{name}.png')))

        words = word_weights(records)
        fig, ax = plt.subplots(figsize=(6, 0.25 * len(words) + 1.2))
        ax.barh([w for w, _, _ in words][::-1], [m for _, _, m in words][::-1], color='#4477aa')
        ax.set(xlabel='mean weight', title=f'{name}: most frequent target words')
        written.append(_save(fig, plt, osp.join(out_dir, f'word_weights_{name}.png')))
    if len(records_by_model) == 2:
        written.append(_plot_pair(plt, records_by_model, out_dir))
    return written


def _plot_pair(plt, records_by_model, out_dir):
    (name_a, a), (name_b, b) = records_by_model.items()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.scatter([r['weight'] for r in a], [r['weight'] for r in b], s=6, alpha=0.5)
    left.set(xlabel=f'weight under {name_a}', ylabel=f'weight under {name_b}',
             title='the same target tokens')
    words = [w for w, _, _ in word_weights(a, top=15)]
    mean_b = {w: m for w, _, m in word_weights(b, top=10 ** 6)}
    mean_a = {w: m for w, _, m in word_weights(a, top=10 ** 6)}
    positions = range(len(words))
    right.barh([p - 0.2 for p in positions], [mean_a[w] for w in words], height=0.4,
               label=name_a)
    right.barh([p + 0.2 for p in positions], [mean_b.get(w, 0.0) for w in words], height=0.4,
               label=name_b)
    right.set_yticks(list(positions), words)
    right.invert_yaxis()
    right.set(xlabel='mean weight', title='most frequent words')
    right.legend(loc='lower right')
    return _save(fig, plt, osp.join(out_dir, f'compare_{name_a}_{name_b}.png'))


def _save(fig, plt, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
