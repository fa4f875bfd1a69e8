"""The layers of the dpa package, and the check that its imports respect them.

The package is built in layers, bottom to top (``LAYERS``)::

    6  package      dpa (dpa/__init__.py, which imports the subpackages so
                    that their registries fill)
    5  analysis, benchmark
    4  evaluation
    3  engine
    2  datasets
    1  models
    0  base         dpa.registry, dpa.errors, dpa.artifacts,
                    dpa.synthetic_text, dpa.layers

Each layer is made of units: a subpackage (with its subpackages: dpa.models
holds dpa.models.internlm2 and dpa.models.chat_templates) or a single base
module. The rule:

* a module may import from its own unit and from the layers below it;
* never from a layer above (the top layer is the aggregator ``dpa`` itself:
  ``import dpa`` from inside the package is always a violation);
* never from a peer unit of its own layer (dpa.analysis and dpa.benchmark
  are independent) -- except in the open layers (``OPEN_LEVELS``): the base
  modules may import one another;
* no import cycles between modules, within a unit as well (a module that
  imports its own package's ``__init__``, which imports it back, is one);
* every module is placed in a layer: a new top-level module or subpackage
  must be added to ``LAYERS``.

Imports are counted wherever they are: at the top of a module, inside a
function (a late import is still a dependency, and still a cycle), under
``if TYPE_CHECKING:`` or in ``try``/``except``. Relative imports are resolved;
``from dpa.x import y`` is an import of the module dpa.x.y when there is one,
else of dpa.x (for a package, its ``__init__``). Imports by string
(``importlib.import_module``) are not seen.

The check reads the source with ``ast``; it imports nothing of the package
(this module imports nothing from dpa, and only the standard library), so it
runs in a fraction of a second: tests/test_layers.py runs it on the tree, and
tools/draw_layers.py draws the layers and the imports between their units
(docs/images/layers.png).
"""
import ast
import functools
from collections import Counter
from pathlib import Path

PACKAGE = 'dpa'

# The architecture, bottom to top: (level name, units). A unit prefix covers
# the module of that name and the modules under it, except the root package
# ``dpa``, which covers only dpa/__init__.py (else it would cover everything,
# and a new top-level module would be placed without anyone deciding where).
LAYERS = (
    ('base', ('dpa.registry', 'dpa.errors', 'dpa.artifacts', 'dpa.synthetic_text',
              'dpa.layers')),
    ('models', ('dpa.models',)),
    ('datasets', ('dpa.datasets',)),
    ('engine', ('dpa.engine',)),
    ('evaluation', ('dpa.evaluation',)),
    ('analysis and benchmark', ('dpa.analysis', 'dpa.benchmark')),
    ('package', ('dpa',)),
)

# Levels whose units may import one another (still without cycles).
OPEN_LEVELS = frozenset({'base'})

DEFAULT_ROOT = Path(__file__).resolve().parent


def _root(root):
    return DEFAULT_ROOT if root is None else Path(root)


def module_files(root=None):
    """{module name: path relative to the root} of every .py file under the
    package root (``dpa/models/__init__.py`` is the module dpa.models)."""
    root = _root(root)
    files = {}
    for path in sorted(root.rglob('*.py')):
        rel = path.relative_to(root)
        if any(part == '__pycache__' or part.startswith('.') for part in rel.parts):
            continue
        parts = list(rel.with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        files['.'.join([PACKAGE] + parts)] = rel
    return files


def display_path(rel):
    """``dpa/models/foo.py`` for the relative path ``models/foo.py``."""
    return f'{PACKAGE}/{rel.as_posix()}'


def _existing(name, modules):
    """The longest module of ``modules`` that ``name`` is or is inside of,
    or None (an import from outside the package)."""
    parts = name.split('.')
    while parts:
        candidate = '.'.join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imported(node, module, is_package, modules):
    """The package modules that one import statement imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ''
        if node.level:
            package = module.split('.') if is_package else module.split('.')[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = '.'.join(package + ([base] if base else []))
        names = [f'{base}.{alias.name}' if alias.name != '*' and f'{base}.{alias.name}' in modules
                 else base for alias in node.names]
    found = (_existing(name, modules) for name in names
             if name == PACKAGE or name.startswith(PACKAGE + '.'))
    return {target for target in found if target is not None}


@functools.lru_cache(maxsize=4096)
def _import_statements(source):
    """The import statements of a module's source, wherever they are (parsed
    once per source text: the check and the picture read the tree several
    times)."""
    return tuple(node for node in ast.walk(ast.parse(source))
                 if isinstance(node, (ast.Import, ast.ImportFrom)))


def import_graph(root=None):
    """{module: {(imported module, line number)}} of the imports inside the
    package, read from the source of every module under ``root`` (default:
    this package), imports in functions and ``if TYPE_CHECKING:`` included."""
    root = _root(root)
    files = module_files(root)
    graph = {}
    for module, rel in files.items():
        try:
            statements = _import_statements((root / rel).read_text(encoding='utf-8'))
        except SyntaxError as error:
            error.filename = display_path(rel)
            raise
        is_package = rel.name == '__init__.py'
        graph[module] = {(target, node.lineno) for node in statements
                         for target in _imported(node, module, is_package, files)}
    return graph


def _covers(prefix, module):
    return module == prefix or (prefix != PACKAGE and module.startswith(prefix + '.'))


def layer_of(module):
    """(level index in LAYERS, unit prefix) of a module, or None where no unit
    covers it (a module that must be placed in a layer)."""
    matches = [(len(prefix), index, prefix)
               for index, (_, prefixes) in enumerate(LAYERS)
               for prefix in prefixes if _covers(prefix, module)]
    if not matches:
        return None
    _, index, prefix = max(matches)
    return index, prefix


def unit_name(unit):
    """``models`` for the unit dpa.models, ``dpa`` for the package."""
    return unit[len(PACKAGE) + 1:] if unit.startswith(PACKAGE + '.') else unit


def broken_rule(module, target):
    """Why ``module`` may not import ``target`` ('a layer above', 'a peer
    layer'), or None where it may (or where one of them is in no layer: that
    is reported of the module itself). Units stand for their modules."""
    source, placed = layer_of(module), layer_of(target)
    if source is None or placed is None or source[1] == placed[1]:
        return None
    if placed[0] > source[0]:
        return 'a layer above'
    if placed[0] == source[0] and LAYERS[source[0]][0] not in OPEN_LEVELS:
        return 'a peer layer'
    return None


def upward_imports(root=None):
    """The violations of the layers, one readable line each, by file and
    line: imports of a layer above or of a peer unit, and modules in no
    layer. Empty when the package keeps its layers."""
    root = _root(root)
    files = module_files(root)
    graph = import_graph(root)
    problems = []
    for module in sorted(graph):
        source = layer_of(module)
        if source is None:
            problems.append((files[module], 0, f'{display_path(files[module])}:1 {module} is in '
                             f'no layer (place it in LAYERS, dpa/layers.py)'))
            continue
        for target, lineno in sorted(graph[module]):
            why = broken_rule(module, target)
            if why is not None:
                problems.append((files[module], lineno,
                                 f'{display_path(files[module])}:{lineno} imports {target} '
                                 f'({unit_name(source[1])} -> {unit_name(layer_of(target)[1])}: '
                                 f'{why})'))
    return [line for _, _, line in sorted(problems)]


def _strongly_connected(graph):
    """Tarjan's strongly connected components of {node: set of nodes},
    iterative (no recursion limit)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components


def import_cycles(root=None):
    """The import cycles of the package: each a sorted list of the modules
    that import one another, directly or not (a strongly connected component
    of more than one module; a module importing itself is ignored)."""
    graph = {module: {target for target, _ in edges}
             for module, edges in import_graph(root).items()}
    return sorted(sorted(component) for component in _strongly_connected(graph)
                  if len(component) > 1)


def unit_modules(root=None):
    """{unit: sorted modules} of the placed modules, units in LAYERS order."""
    files = module_files(root)
    units = {prefix: [] for _, prefixes in LAYERS for prefix in prefixes}
    for module in sorted(files):
        placed = layer_of(module)
        if placed is not None:
            units[placed[1]].append(module)
    return units


def layer_edges(root=None):
    """Counter {(importing unit, imported unit): import statements} of the
    imports between units (those within a unit are left out)."""
    counts = Counter()
    for module, edges in import_graph(root).items():
        source = layer_of(module)
        if source is None:
            continue
        statements = {}
        for target, lineno in edges:
            placed = layer_of(target)
            if placed is not None and placed[1] != source[1]:
                statements.setdefault(placed[1], set()).add(lineno)
        for unit, lines in statements.items():
            counts[source[1], unit] += len(lines)
    return counts
