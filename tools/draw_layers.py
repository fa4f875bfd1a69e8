"""Draw the layers of the dpa package and the imports between their units.

    python tools/draw_layers.py [--out docs/images/layers.png]

One row per layer of ``LAYERS`` (dpa/layers.py), the base at the bottom; a
box per unit (a subpackage or a base module) with its number of modules; an
arrow from each unit to each unit it imports from, with the number of import
statements on it (function-level imports included). Arrows against the layers
(to a layer above, or to a peer) are red. Read from the source with ``ast``:
nothing of the package is imported, so neither is torch.
"""
import argparse
import importlib.util
import os
import os.path as osp

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_OUT = osp.join('docs', 'images', 'layers.png')

# Layout, in data units (1 unit = 1 inch at the aspect kept equal).
WIDTH = 10.0        # of the rows
ROW_STEP = 1.25     # between the rows' centres
BOX_HEIGHT = 0.5
BOX_WIDTH = 1.7     # at most; narrower when a row is full
SHIFT = 1.6         # single-box rows alternate left and right of the centre by this
RAD = 0.12          # curvature of the arrows (A->B and B->A bend apart)
LABEL_AT = 0.4      # where on an arrow (0 = importing unit, 1 = imported) its count sits
DPI = 100


def load_layers():
    """dpa/layers.py, loaded by path (``import dpa`` would import torch)."""
    spec = importlib.util.spec_from_file_location('dpa_layers', osp.join(REPO, 'dpa', 'layers.py'))
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)
    return layers


def positions(layers):
    """{unit: (x, y)} of the box centres; deterministic (LAYERS order)."""
    centres = {}
    top = len(layers.LAYERS) - 1
    for level, (_, units) in enumerate(layers.LAYERS):
        y = level * ROW_STEP
        if len(units) == 1:
            # Alternate the single boxes so that an arrow over several rows
            # does not run through the boxes between (the top one centred).
            x = WIDTH / 2 if level == top else WIDTH / 2 + (SHIFT if level % 2 else -SHIFT)
            centres[units[0]] = (x, y)
        else:
            for i, unit in enumerate(units):
                centres[unit] = (WIDTH * (i + 0.5) / len(units), y)
    return centres


def box_width(layers, unit):
    count = next(len(units) for _, units in layers.LAYERS if unit in units)
    return min(BOX_WIDTH, WIDTH / count - 0.3)


def against_layers(layers, source, target):
    (level, _), (target_level, _) = layers.layer_of(source), layers.layer_of(target)
    return target_level > level or (target_level == level
                                    and layers.LAYERS[level][0] not in layers.OPEN_LEVELS)


def on_arc(start, end, rad, t):
    """The point at ``t`` of matplotlib's arc3 curve from start to end."""
    (x1, y1), (x2, y2) = start, end
    cx, cy = (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)
    a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
    return a * x1 + b * cx + c * x2, a * y1 + b * cy + c * y2


def draw(root=None, out=DEFAULT_OUT):
    layers = load_layers()
    modules = layers.unit_modules(root)
    edges = layers.layer_edges(root)
    centres = positions(layers)
    margin_left, top = 2.3, (len(layers.LAYERS) - 1) * ROW_STEP
    fig = plt.figure(figsize=(WIDTH + margin_left + 0.2, top + 1.9), dpi=DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-margin_left, WIDTH + 0.2)
    ax.set_ylim(-0.6, top + 1.3)
    ax.set_aspect('equal')
    ax.axis('off')

    boxes = {}
    for level, (name, units) in enumerate(layers.LAYERS):
        y = level * ROW_STEP
        ax.text(-margin_left + 0.15, y, f'{level}  {name}', ha='left', va='center', fontsize=11,
                color='#444444', wrap=True)
        ax.plot([-margin_left + 0.1, WIDTH + 0.1], [y - ROW_STEP / 2] * 2, color='#dddddd',
                lw=0.8, zorder=0)
        for unit in units:
            x, y = centres[unit]
            w = box_width(layers, unit)
            box = FancyBboxPatch((x - w / 2, y - BOX_HEIGHT / 2), w, BOX_HEIGHT,
                                 boxstyle='round,pad=0.02,rounding_size=0.08',
                                 facecolor='#e8f0fb', edgecolor='#3b6aa0', lw=1.2, zorder=3)
            ax.add_patch(box)
            boxes[unit] = box
            n = len(modules[unit])
            ax.text(x, y + 0.07, layers.unit_name(unit), ha='center', va='center', fontsize=11,
                    weight='bold', zorder=4)
            ax.text(x, y - 0.13, f'{n} module{"s" if n != 1 else ""}', ha='center',
                    va='center', fontsize=8.5, color='#555555', zorder=4)

    bad = 0
    for (source, target), count in sorted(edges.items()):
        wrong = against_layers(layers, source, target)
        bad += wrong
        colour = '#c62828' if wrong else '#7a8699'
        ax.annotate('', xy=centres[target], xytext=centres[source], zorder=2,
                    arrowprops=dict(arrowstyle='-|>', color=colour, lw=2.0 if wrong else 1.0,
                                    mutation_scale=11, shrinkA=1, shrinkB=1,
                                    patchA=boxes[source], patchB=boxes[target],
                                    connectionstyle=f'arc3,rad={RAD}'))
        x, y = on_arc(centres[source], centres[target], RAD, LABEL_AT)
        ax.text(x, y, str(count), ha='center', va='center', fontsize=8, color=colour, zorder=5,
                bbox=dict(boxstyle='round,pad=0.12', facecolor='white', edgecolor=colour,
                          lw=0.6))

    ax.text(-margin_left + 0.15, top + 0.95, 'Layers of dpa: imports between units',
            ha='left', va='center', fontsize=14, weight='bold')
    ax.text(-margin_left + 0.15, top + 0.6,
            'an arrow per unit imported from, with its number of import statements '
            '(function-level included); dpa/layers.py', ha='left', va='center', fontsize=9,
            color='#444444')
    ax.legend(handles=[Line2D([], [], color='#7a8699', lw=1.0, label='downward (allowed)'),
                       Line2D([], [], color='#c62828', lw=2.0,
                              label='upward or to a peer (violation)')],
              loc='upper right', bbox_to_anchor=(0.995, 0.995), fontsize=9, frameon=False)
    if osp.dirname(out):
        os.makedirs(osp.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return len(modules), len(edges), bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=DEFAULT_OUT, help=f'the picture (default {DEFAULT_OUT})')
    parser.add_argument('--root', default=None, help='the package directory (default: dpa/)')
    args = parser.parse_args(argv)
    units, relations, bad = draw(args.root, args.out)
    print(f'wrote {args.out}: {units} units, {relations} import relations between them, '
          f'{bad} against the layers')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
