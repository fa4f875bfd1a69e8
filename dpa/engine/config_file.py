"""Reading a config file, and the ``--cfg-options`` that change it.

- Mistakes in a config file are reported as a :class:`ConfigError` that names
  the file: mmengine parses a config and its ``_base_`` files without their
  names, so a syntax error says ``File "<unknown>"``.
- ``--cfg-options KEY=VALUE ...`` is read by :class:`CfgOptionsAction`, the
  one parser of every tool. mmengine's ``DictAction`` deletes every space of
  a value (``/data/my files/a.json`` became ``/data/myfiles/a.json``) and
  recurses without end on a Python-style value (``lora=dict(r=8)``); this one
  keeps spaces and quoted text, reads the same lists, tuples, numbers,
  booleans and ``None``, and refuses a dict with the dotted keys to write
  instead.
"""
import argparse
import ast
import os.path as osp
from typing import Dict, List, Optional, Sequence

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


# ---------------------------------------------------------------- --cfg-options

_CLOSING = {'[': ']', '(': ')'}
_QUOTES = '\'"'


def _split_top_level(text: str, where: str) -> List[str]:
    """``text`` cut at the commas outside quotes and brackets. A quote opens
    quoted text only at the start of an item (``/data/O'Brien`` is a path)."""
    parts, depth, quote, start, item_start = [], [], None, 0, True
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in _QUOTES and item_start:
            quote = char
        elif char in _CLOSING:
            depth.append(_CLOSING[char])
        elif char in ')]':
            if not depth or depth.pop() != char:
                raise ConfigError(f'{where}: unbalanced brackets in {text!r}')
        elif char == ',' and not depth:
            parts.append(text[start:i])
            start = i + 1
        item_start = char in ',[( ' if not char.isspace() else item_start
    if quote or depth:
        raise ConfigError(f'{where}: unclosed {quote or "bracket"} in {text!r}')
    last = text[start:]
    return parts + [last] if not parts or last.strip() else parts  # (a,) is a 1-tuple


def _scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ('true', 'false'):
        return text.lower() == 'true'
    return None if text == 'None' else text


def _dotted_spelling(key: str, text: str) -> str:
    """``finetune.lora.r=8 finetune.lora.lora_alpha=16`` for
    ``finetune.lora=dict(r=8, lora_alpha=16)``, when the value reads as one."""
    def flatten(prefix, node):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'dict' \
                and not node.args and all(k.arg for k in node.keywords):
            items = [(k.arg, k.value) for k in node.keywords]
        elif isinstance(node, ast.Dict) and all(
                isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
            items = [(k.value, v) for k, v in zip(node.keys, node.values)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                not any(c in node.value for c in ' ,[](){}\'"'):
            return [f'{prefix}={node.value}']  # a plain string needs no quotes
        else:
            return [f'{prefix}={ast.unparse(node)}']
        return [line for name, value in items for line in flatten(f'{prefix}.{name}', value)]

    try:
        return ' '.join(flatten(key, ast.parse(text, mode='eval').body))
    except SyntaxError:
        return f'{key}.KEY=VALUE'


def parse_cfg_value(text: str, key: str = 'value'):
    """One ``--cfg-options`` value as mmengine's ``DictAction`` reads it
    (``[a,b]`` and ``a,b`` lists, ``(a,b)`` tuples, nested; int, float,
    ``true``/``false``, ``None``; anything else a string), but quote-aware:
    spaces inside a value are kept, a quoted value is a string as written.

    Raises:
        ConfigError: a dict (``dict(...)`` or ``{...}``), which
            ``--cfg-options`` sets key by key, or unbalanced brackets/quotes.
    """
    where = f'--cfg-options {key}={text}'
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        return text[1:-1]
    if text.startswith('{') or text.replace(' ', '').startswith('dict('):
        raise ConfigError(
            f'{where}: a value cannot be a dict (the Python a config file would say); set each '
            f'key on its own, e.g. --cfg-options {_dotted_spelling(key, text)}')
    if text[:1] in _CLOSING and text[-1:] == _CLOSING[text[0]]:
        inner = text[1:-1]
        items = [parse_cfg_value(item, key) for item in _split_top_level(inner, where)
                 ] if inner.strip() else []
        return tuple(items) if text[0] == '(' else items
    parts = _split_top_level(text, where)
    if len(parts) > 1:
        return [parse_cfg_value(item, key) for item in parts]
    return _scalar(text)


def parse_cfg_options(items: Sequence[str]) -> Dict[str, object]:
    """``['a.b=1', 'c=[x, y]']`` -> ``{'a.b': 1, 'c': ['x', 'y']}`` (see
    :func:`parse_cfg_value`).

    Raises:
        ConfigError: an item is not ``KEY=VALUE``, or its value is refused.
    """
    options = {}
    for item in items:
        key, equals, value = item.partition('=')
        if not equals or not key.strip():
            raise ConfigError(f'--cfg-options {item!r}: write KEY=VALUE, e.g. '
                              'align.batch_size=8')
        options[key.strip()] = parse_cfg_value(value, key.strip())
    return options


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value} is not at least 1')
    return value


def positive_number(text: str) -> float:
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'{text} is not a positive number')
    return value


class CfgOptionsAction(argparse.Action):
    """``--cfg-options KEY=VALUE ...`` into a dict (:func:`parse_cfg_options`);
    a refused value is a usage error naming the key."""

    def __call__(self, parser, namespace, values, option_string=None):
        options = dict(getattr(namespace, self.dest, None) or {})
        try:
            options.update(parse_cfg_options(values or []))
        except ConfigError as err:
            parser.error(str(err))
        setattr(namespace, self.dest, options)


def add_cfg_options(parser: argparse.ArgumentParser, help: str = 'override config keys, '
                    'e.g. align.batch_size=8 llm.pretrained=/ckpt/llm (a dict key by key: '
                    'finetune.lora.r=8)') -> None:
    """The ``--cfg-options`` argument, read by :class:`CfgOptionsAction`."""
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction, default={},
                        metavar='KEY=VALUE', help=help)
