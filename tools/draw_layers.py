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
import textwrap

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_OUT = osp.join('docs', 'images', 'layers.png')

# Layout, in data units (1 unit = 1 inch at the aspect kept equal).
WIDTH = 8.2         # of the rows
MARGIN = 1.6        # on the left, for the layers' names
ROW_STEP = 1.05     # between the rows' centres
BOX_HEIGHT = 0.46
BOX_WIDTH = 1.5     # at most; narrower when a row is full
SHIFT = 1.8         # single-box rows alternate left and right of the centre by this
RADS = (0.1, -0.1, 0.2, -0.2, 0.3, -0.3, 0.4, -0.4, 0.5, -0.5)
# ^ curvatures (matplotlib's arc3) tried in turn for an arrow: the first of
#   those crossing the fewest boxes (A->B and B->A bend apart)
LABEL_AT = (0.5, 0.4, 0.6, 0.3, 0.7, 0.25, 0.75)
# ^ where on an arrow (0: the importing unit) its count may sit, tried in turn:
#   the first clear of the boxes and of the counts already placed
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
        elif level == 0:
            for i, unit in enumerate(units):
                centres[unit] = (WIDTH * (i + 0.5) / len(units), y)
        else:
            # Out to the sides, clear of the single boxes' column.
            w = box_width(layers, units[0])
            for i, unit in enumerate(units):
                centres[unit] = (w / 2 + 0.05 + i * (WIDTH - w - 0.1) / (len(units) - 1), y)
    return centres


def box_width(layers, unit):
    count = next(len(units) for _, units in layers.LAYERS if unit in units)
    return min(BOX_WIDTH, WIDTH / count - 0.3)


def on_arc(start, end, rad, t):
    """The point at ``t`` of matplotlib's arc3 curve from start to end."""
    (x1, y1), (x2, y2) = start, end
    cx, cy = (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)
    a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
    return a * x1 + b * cx + c * x2, a * y1 + b * cy + c * y2


def rect(layers, centres, unit, pad=0.0):
    x, y = centres[unit]
    w = box_width(layers, unit)
    return x - w / 2 - pad, y - BOX_HEIGHT / 2 - pad, x + w / 2 + pad, y + BOX_HEIGHT / 2 + pad


def inside(point, rectangle):
    x0, y0, x1, y1 = rectangle
    return x0 <= point[0] <= x1 and y0 <= point[1] <= y1


def route(start, end, obstacles):
    """The first curvature of RADS whose arc from start to end crosses the
    fewest obstacle rectangles (sampled)."""
    def hits(rad):
        points = [on_arc(start, end, rad, i / 40) for i in range(1, 40)]
        return sum(any(inside(point, r) for point in points) for r in obstacles)
    return min(RADS, key=lambda rad: (hits(rad), RADS.index(rad)))


def label_spot(start, end, rad, obstacles, taken):
    """The first place of LABEL_AT on the arc clear of the obstacles and of
    the labels taken (else the middle)."""
    for t in LABEL_AT:
        x, y = on_arc(start, end, rad, t)
        if not any(inside((x, y), r) for r in obstacles) and all(
                abs(x - u) > 0.22 or abs(y - v) > 0.16 for u, v in taken):
            return x, y
    return on_arc(start, end, rad, 0.5)


def draw(root=None, out=DEFAULT_OUT):
    layers = load_layers()
    modules = layers.unit_modules(root)
    edges = layers.layer_edges(root)
    centres = positions(layers)
    top = (len(layers.LAYERS) - 1) * ROW_STEP
    fig = plt.figure(figsize=(WIDTH + MARGIN, top + 1.55), dpi=DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-MARGIN, WIDTH)
    ax.set_ylim(-0.45, top + 1.1)
    ax.set_aspect('equal')
    ax.axis('off')

    boxes = {}
    for level, (name, units) in enumerate(layers.LAYERS):
        y = level * ROW_STEP
        ax.text(-MARGIN + 0.1, y, f'{level}  ' + textwrap.fill(name, 12).replace('\n', '\n    '),
                ha='left', va='center', fontsize=10, color='#444444')
        if level:
            ax.plot([-MARGIN + 0.05, WIDTH - 0.05], [y - ROW_STEP / 2] * 2, color='#dddddd',
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
            ax.text(x, y + 0.07, layers.unit_name(unit), ha='center', va='center', fontsize=10,
                    weight='bold', zorder=4)
            ax.text(x, y - 0.12, f'{n} module{"s" if n != 1 else ""}', ha='center',
                    va='center', fontsize=8, color='#555555', zorder=4)

    bad, taken = 0, []
    rects = {unit: rect(layers, centres, unit, pad=0.06) for unit in centres}
    for (source, target), count in sorted(edges.items(), key=lambda e: (-e[1], e[0])):
        wrong = layers.broken_rule(source, target) is not None
        bad += wrong
        colour = '#c62828' if wrong else '#7a8699'
        start, end = centres[source], centres[target]
        rad = route(start, end, [r for unit, r in rects.items() if unit not in (source, target)])
        ax.annotate('', xy=end, xytext=start, zorder=2.5 if wrong else 2,
                    arrowprops=dict(arrowstyle='-|>', color=colour, lw=1.8 if wrong else 0.9,
                                    mutation_scale=10, shrinkA=1, shrinkB=1,
                                    patchA=boxes[source], patchB=boxes[target],
                                    connectionstyle=f'arc3,rad={rad}'))
        x, y = label_spot(start, end, rad, list(rects.values()), taken)
        taken.append((x, y))
        ax.text(x, y, str(count), ha='center', va='center', fontsize=7.5, color=colour,
                zorder=5, bbox=dict(boxstyle='round,pad=0.1', facecolor='white',
                                    edgecolor=colour, lw=0.5))

    ax.text(-MARGIN + 0.1, top + 0.82, 'Layers of dpa: imports between units',
            ha='left', va='center', fontsize=13, weight='bold')
    ax.text(-MARGIN + 0.1, top + 0.5,
            'an arrow per unit imported from, with its number of import statements\n'
            '(function-level included); the layers: dpa/layers.py', ha='left', va='center',
            fontsize=8.5, color='#444444', linespacing=1.3)
    ax.legend(handles=[Line2D([], [], color='#7a8699', lw=0.9, label='downward (allowed)'),
                       Line2D([], [], color='#c62828', lw=1.8,
                              label='upward or to a peer (violation)')],
              loc='upper right', bbox_to_anchor=(0.995, 0.995), fontsize=8.5, frameon=False)
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
    layers = load_layers()
    unplaced = [m for m in layers.module_files(args.root) if layers.layer_of(m) is None]
    if unplaced:
        print(f'not drawn, in no layer of LAYERS (dpa/layers.py): {", ".join(unplaced)}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
