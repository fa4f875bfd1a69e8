"""A checkpoint's own modeling/tokenizer code, loaded on request.

transformers 5 prefers a class registered in the process over a checkpoint's
``auto_map`` code even with ``trust_remote_code=True``, so once the project
registers its own implementation of a family (InternLM2), the Auto classes no
longer reach the checkpoint's files. ``use_checkpoint_code=True`` on
``HFCausalLM`` / ``HFTokenizer`` loads the classes ``auto_map`` names directly.
"""
import json
import os.path as osp

from transformers.dynamic_module_utils import get_class_from_dynamic_module


def checkpoint_code_class(directory: str, auto_class: str, trust_remote_code: bool):
    """The class ``directory``'s ``auto_map`` names for ``auto_class``.

    Args:
        directory: a local checkpoint.
        auto_class: ``'AutoConfig'``, ``'AutoModelForCausalLM'`` (read from
            config.json) or ``'AutoTokenizer'`` (from tokenizer_config.json;
            its fast class if it names one).
        trust_remote_code: must be True: the class's code runs.

    Raises:
        ValueError: not trusted, or the checkpoint names no such code.
    """
    if not trust_remote_code:
        raise ValueError(f"use_checkpoint_code=True runs {directory}'s own code: set "
                         'trust_remote_code=True as well')
    name = 'tokenizer_config.json' if auto_class == 'AutoTokenizer' else 'config.json'
    path = osp.join(directory, name)
    auto_map = {}
    if osp.isfile(path):
        with open(path, encoding='utf-8') as f:
            auto_map = json.load(f).get('auto_map') or {}
    reference = auto_map.get(auto_class)
    if isinstance(reference, (list, tuple)):  # tokenizers: [slow, fast]
        reference = reference[1] or reference[0]
    if not reference:
        raise ValueError(f'use_checkpoint_code=True but {path} names no {auto_class} code in '
                         '`auto_map`; drop use_checkpoint_code to use the library implementation')
    return get_class_from_dynamic_module(reference, directory)
