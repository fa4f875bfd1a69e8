"""Reading a config file, with mistakes reported as a :class:`ConfigError`
that names the file: mmengine parses a config and its ``_base_`` files
without their names, so a syntax error says ``File "<unknown>"``."""
import ast
import os.path as osp
from typing import List, Optional

from mmengine.config import Config

from dpa.errors import ConfigError


def _base_files(path: str, tree: ast.Module) -> List[str]:
    """The ``_base_`` files a parsed config names, as paths."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == '_base_' for t in node.targets):
            try:
                bases = ast.literal_eval(node.value)
            except ValueError:
                return []
            bases = [bases] if isinstance(bases, str) else bases
            return [osp.join(osp.dirname(path), b) for b in bases if isinstance(b, str)]
    return []


def _syntax_problem(path: str, seen: Optional[set] = None) -> Optional[str]:
    """The first syntax error of ``path`` or of a ``_base_`` file it names,
    with that file's name and line."""
    seen = set() if seen is None else seen
    if path in seen or not osp.isfile(path):
        return None
    seen.add(path)
    with open(path, encoding='utf-8') as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as err:
        return f'{path}, line {err.lineno}: {err.msg}'
    for base in _base_files(path, tree):
        problem = _syntax_problem(osp.normpath(base), seen)
        if problem:
            return problem
    return None


def load_config(path: str) -> Config:
    """``Config.fromfile(path)``.

    Raises:
        ConfigError: the file (or a ``_base_`` file) does not exist, is not
            valid Python, or fails when mmengine reads it; the message names
            the file.
    """
    if not osp.isfile(path):
        raise ConfigError(f'config file {path!r} does not exist (a path to a .py config, '
                          'e.g. configs/dpa_tiny.py)')
    try:
        return Config.fromfile(path)
    except SyntaxError as err:
        problem = _syntax_problem(path) or f'{path}: {err.msg}'
        raise ConfigError(f'config syntax error in {problem}') from None
    except FileNotFoundError as err:
        raise ConfigError(f'{path}: a file it names does not exist ({err.filename or err})'
                          ) from None
    except (ImportError, NameError, TypeError, ValueError, KeyError, AttributeError,
            UnicodeDecodeError) as err:
        raise ConfigError(f'cannot read config {path}: {type(err).__name__}: {err}') from None
