"""The layers of the package (dpa/layers.py): the real tree keeps them, and
violations planted in a copy of the package are found, each at its file and
line. Reads source only (ast); nothing of the package is imported."""
import functools
import importlib.util
import shutil
import textwrap
from pathlib import Path

import pytest

DPA_ROOT = Path(__file__).resolve().parent.parent / 'dpa'

# Loaded by path: `import dpa.layers` would run dpa/__init__.py, which imports
# the subpackages (torch, transformers, mmengine); the check needs none of it.
_spec = importlib.util.spec_from_file_location('dpa_layers_under_test', DPA_ROOT / 'layers.py')
layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layers)


def _lines(lines):
    return '\n'.join(lines)


# --- the real tree ---------------------------------------------------------

def test_real_tree_keeps_its_layers():
    problems = layers.upward_imports()
    assert not problems, 'imports against the layers (dpa/layers.py):\n' + _lines(problems)


def test_real_tree_has_no_import_cycles():
    cycles = layers.import_cycles()
    assert not cycles, 'import cycles:\n' + _lines(' <-> '.join(cycle) for cycle in cycles)


def test_every_module_is_placed_in_a_layer():
    files = layers.module_files()
    unplaced = [layers.display_path(rel) for module, rel in files.items()
                if layers.layer_of(module) is None]
    assert not unplaced, 'modules in no layer (add them to LAYERS):\n' + _lines(unplaced)
    assert not [line for line in layers.upward_imports() if 'is in no layer' in line]
    # Every unit of LAYERS is there, once.
    units = [prefix for _, prefixes in layers.LAYERS for prefix in prefixes]
    assert len(units) == len(set(units))
    assert all(any(layers.layer_of(module)[1] == unit for module in files) for unit in units)


def test_layers_data():
    assert [name for name, _ in layers.LAYERS] == [
        'base', 'models', 'datasets', 'engine', 'evaluation', 'analysis and benchmark',
        'package']
    assert layers.layer_of('dpa') == (6, 'dpa')
    assert layers.layer_of('dpa.errors') == (0, 'dpa.errors')
    assert layers.layer_of('dpa.models') == (1, 'dpa.models')
    assert layers.layer_of('dpa.models.internlm2.modeling_internlm2') == (1, 'dpa.models')
    assert layers.layer_of('dpa.models.chat_templates') == (1, 'dpa.models')
    assert layers.layer_of('dpa.analysis.prior_conflict.data') == (5, 'dpa.analysis')
    assert layers.layer_of('dpa.benchmark.cli') == (5, 'dpa.benchmark')
    assert layers.layer_of('dpa.newthing') is None
    assert layers.layer_of('dpa.errors_extra') is None
    assert layers.broken_rule('dpa.models.mllm', 'dpa.engine') == 'a layer above'
    assert layers.broken_rule('dpa.analysis', 'dpa.benchmark.cli') == 'a peer layer'
    assert layers.broken_rule('dpa.registry', 'dpa.errors') is None  # base: open
    assert layers.broken_rule('dpa.engine.x', 'dpa.models.y') is None
    assert layers.broken_rule('dpa.engine.x', 'dpa.engine') is None  # own unit
    assert layers.broken_rule('dpa.evaluation.x', 'dpa') == 'a layer above'


def test_the_check_imports_nothing_of_dpa():
    graph = layers.import_graph()
    assert graph['dpa.layers'] == set()


# --- violations planted in a copy ------------------------------------------

@pytest.fixture
def copy(tmp_path):
    """A copy of the package, to plant modules in."""
    root = tmp_path / 'dpa'
    shutil.copytree(DPA_ROOT, root, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    return root


def plant(root, rel, source):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip('\n'))
    return path


@functools.lru_cache(maxsize=None)
def real_tree():
    """(violations, cycles) of the real tree, read once."""
    return layers.upward_imports(), layers.import_cycles()


def new_problems(root):
    """The violations of the copy that the real tree does not have."""
    return [line for line in layers.upward_imports(root) if line not in real_tree()[0]]


def new_cycles(root):
    """The import cycles of the copy that the real tree does not have."""
    return [cycle for cycle in layers.import_cycles(root) if cycle not in real_tree()[1]]


def test_top_level_upward_import(copy):
    plant(copy, 'models/_planted.py', """
        import os

        from dpa.engine.pipeline import run_pipeline
        """)
    assert new_problems(copy) == [
        'dpa/models/_planted.py:3 imports dpa.engine.pipeline (models -> engine: a layer above)']


@pytest.mark.parametrize('source, lineno', [
    ("""
     def load():
         from dpa.engine.pipeline import run_pipeline
         return run_pipeline
     """, 2),
    ("""
     from typing import TYPE_CHECKING

     if TYPE_CHECKING:
         from dpa.engine.pipeline import run_pipeline
     """, 4),
    ("""
     class Loader:
         def load(self):
             try:
                 import dpa.engine.pipeline
             except ImportError:
                 return None
     """, 4),
], ids=['function', 'type-checking', 'method-try'])
def test_nested_upward_import(copy, source, lineno):
    plant(copy, 'models/_planted.py', source)
    assert new_problems(copy) == [
        f'dpa/models/_planted.py:{lineno} imports dpa.engine.pipeline '
        f'(models -> engine: a layer above)']


def test_relative_upward_import(copy):
    plant(copy, 'models/_planted.py', """
        from ..engine import pipeline
        from ..evaluation import EVALUATORS_NOT_A_MODULE
        from . import builders
        """)
    assert new_problems(copy) == [
        'dpa/models/_planted.py:1 imports dpa.engine.pipeline (models -> engine: a layer above)',
        'dpa/models/_planted.py:2 imports dpa.evaluation (models -> evaluation: a layer above)']
    # In a subpackage's __init__, one dot is the subpackage itself.
    plant(copy, 'models/internlm2/_sub/__init__.py', 'from ....datasets.llava import read_rows\n')
    assert ('dpa/models/internlm2/_sub/__init__.py:1 imports dpa.datasets.llava '
            '(models -> datasets: a layer above)') in new_problems(copy)


def test_import_of_the_package_itself(copy):
    """`import dpa` inside the package: the aggregator is the top layer."""
    plant(copy, 'evaluation/_planted.py', """
        def registries():
            import dpa  # noqa: F401
        """)
    assert new_problems(copy) == [
        'dpa/evaluation/_planted.py:2 imports dpa (evaluation -> dpa: a layer above)']


@pytest.mark.parametrize('rel, source, line', [
    ('analysis/_planted.py', 'from dpa.benchmark.report import markdown\n',
     'dpa/analysis/_planted.py:1 imports dpa.benchmark.report '
     '(analysis -> benchmark: a peer layer)'),
    ('benchmark/_planted.py', 'def f():\n    from ..analysis import relevance\n',
     'dpa/benchmark/_planted.py:2 imports dpa.analysis.relevance '
     '(benchmark -> analysis: a peer layer)'),
], ids=['analysis-benchmark', 'benchmark-analysis'])
def test_peer_import(copy, rel, source, line):
    plant(copy, rel, source)
    assert new_problems(copy) == [line]


@pytest.mark.parametrize('second', [
    'from dpa.models._a import VALUE\n',
    'def late():\n    from . import _a\n    return _a\n',
], ids=['top-level', 'function-level'])
def test_cycle_within_a_layer(copy, second):
    plant(copy, 'models/_a.py', 'from dpa.models import _b\nVALUE = 1\n')
    plant(copy, 'models/_b.py', second)
    assert ['dpa.models._a', 'dpa.models._b'] in layers.import_cycles(copy)
    assert new_cycles(copy) == [['dpa.models._a', 'dpa.models._b']]
    assert new_problems(copy) == []  # within one unit: a cycle, not a layer violation


def test_longer_cycle_and_self_import(copy):
    plant(copy, 'engine/_a.py', 'from . import _b\nfrom . import _a\n')
    plant(copy, 'engine/_b.py', 'from . import _c\n')
    plant(copy, 'engine/_c.py', 'def f():\n    import dpa.engine._a\n')
    plant(copy, 'engine/_d.py', 'import dpa.engine._d\n')
    assert new_cycles(copy) == [['dpa.engine._a', 'dpa.engine._b', 'dpa.engine._c']]


@pytest.mark.parametrize('rel, module', [
    ('newthing.py', 'dpa.newthing'),
    ('newpkg/__init__.py', 'dpa.newpkg'),
])
def test_unplaced_module(copy, rel, module):
    plant(copy, rel, 'from dpa.errors import ConfigError\n')
    # Imported from a placed module: reported once, as unplaced.
    plant(copy, 'engine/_planted.py', f'import {module}\n')
    assert new_problems(copy) == [
        f'dpa/{rel}:1 {module} is in no layer (place it in LAYERS, dpa/layers.py)']


def test_downward_imports_are_allowed(copy):
    plant(copy, 'engine/_planted.py', """
        from dpa.models.builders import build_model
        from ..datasets import llava
        from dpa import errors


        def late():
            from dpa.registry import MODELS
            import dpa.synthetic_text
            return MODELS
        """)
    graph = layers.import_graph(copy)
    assert graph['dpa.engine._planted'] == {
        ('dpa.models.builders', 1), ('dpa.datasets.llava', 2), ('dpa.errors', 3),
        ('dpa.registry', 7), ('dpa.synthetic_text', 8)}
    assert new_problems(copy) == []


def test_base_modules_may_import_one_another(copy):
    errors = copy / 'errors.py'
    errors.write_text(errors.read_text() + '\n\ndef f():\n    from dpa.registry import MODELS\n')
    lineno = len(errors.read_text().splitlines())
    assert ('dpa.registry', lineno) in layers.import_graph(copy)['dpa.errors']
    assert new_problems(copy) == []
