"""What a command line may change, checked before any model loads.

- ``--cfg-options``: mmengine's ``Config.merge_from_dict`` accepts any key, so
  a typo (``proxy.batchsize=2``) would be silently ignored. Keys must exist in
  the resolved config, or be one a user may legitimately add (see
  :data:`ADDABLE`), and values must have the type of the value they replace.
- ``--resume``: the stage's resolved config (the parts that change the
  result, the sha256 of its data files and a fingerprint of the images it
  reads) is saved when the stage starts; a resumed stage compares and refuses
  any difference unless the change is allowed explicitly, which the manifest
  then records. The same config is recorded in the stage's manifest
  (``stage_config``), which a later run compares before it skips the stage
  (:mod:`dpa.engine.staleness`).
"""
import difflib
import fnmatch
import hashlib
import inspect
import json
import logging
import os
import os.path as osp
from typing import Dict, List, Optional

from mmengine.dist import is_main_process
from mmengine.logging import print_log

from dpa.datasets.llava import read_rows
from dpa.datasets.mixture import as_list, data_sources
from dpa.artifacts import atomic_write, read_manifest, sha256_of, write_manifest
from dpa.engine.checkpoint import latest_complete_checkpoint
from dpa.errors import ConfigError
from dpa.engine.paths import PLACEHOLDER
from dpa.engine.stage_config import STAGES
from dpa.engine.staleness import (IMAGE_FINGERPRINTS, INPUT_CHECKSUMS,  # noqa: F401
                                  config_differences)
from dpa.models.builders import PROCESSORS
from dpa.registry import MODELS

# Keys the code reads with ``cfg.get`` / ``recipe.get`` and a default, so a
# config may lack them and a command line may add them.
ADDABLE = (
    'tiny_standin', 'standin_data_root', 'standin_data', 'standin_data.*', 'llm_standin',
    'llm_standin.*', 'vision_standin', 'vision_standin.*', 'skip_nonfinite_steps',
    'max_bad_fraction', 'max_nonfinite_fraction', 'pad_to_square', 'max_image_pixels',
    'strategy', 'strategy.*',
    'mixed_precision', 'work_dir', 'launcher', 'seed', 'synthetic_data', 'synthetic_data.*',
    'custom_hooks', 'stages', 'trainable_dtype', 'randomness.*', 'eval', 'eval.*',
    # The GPU runtime switches (configs/_base_/runtime_gpu.py), for configs without them.
    'dataloader', 'dataloader.*', 'tf32', 'compile', 'compile.*',
    # Hugging Face config fields of a model built from a config (rope scaling, ...).
    '*.config.*',
    # Mixture sources and their settings.
    '*.sources.*',
) + tuple(f'{stage}.{key}' for stage in STAGES for key in (
    'num_workers', 'group_by_modality_length', 'pack', 'trainable', 'use_proxy',
    'init_from_proxy', 'checkpoint_interval', 'caption_suffix', 'image_mode', 'labels', 'lora',
    'projector_lr',
    'from_work_dir',
    'lora.*', 'loss.*', 'optim_wrapper.*'))
# Parts built from ``type=`` whose builder's other arguments may be added.
BUILT_PARTS = ('llm', 'vision_tower', 'tokenizer', 'image_processor', 'model')
STAGE_CONFIG = 'stage_config.json'
DATA_CHECKSUMS = 'data_checksums'
# The images a stage reads are fingerprinted by content (sha256) up to this many
# bytes in all, by size and modification time beyond (reading them all at every
# start would cost minutes on a large set).
CONTENT_HASH_BYTES = 256 << 20


def _dotted_keys(node, prefix: str = '') -> List[str]:
    keys = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f'{prefix}{key}'
            keys.append(path)
            keys += _dotted_keys(value, path + '.')
    return keys


def _placeholders(node) -> set:
    """Names used as ``{name}`` path variables anywhere in the config."""
    if isinstance(node, str):
        return set(PLACEHOLDER.findall(node))
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, (list, tuple)):
        return set().union(*(_placeholders(v) for v in node)) if node else set()
    return set()


def _builder_accepts(node: dict, key: str) -> bool:
    """Whether the registered builder of ``node['type']`` takes ``key``
    (unknown builders are given the benefit of the doubt)."""
    for registry in (MODELS, PROCESSORS):
        builder = registry.get(node['type']) if isinstance(node.get('type'), str) else None
        if builder is not None:
            parameters = inspect.signature(builder).parameters
            return key in parameters or any(p.kind == p.VAR_KEYWORD
                                            for p in parameters.values())
    return True


def _suggestion(cfg, key: str) -> str:
    keys = _dotted_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return f'; did you mean `{close[0]}`?'
    last = key.rsplit('.', 1)[-1]
    same_name = [k for k in keys if k.rsplit('.', 1)[-1] == last]
    if same_name:
        return f'; did you mean one of {", ".join(f"`{k}`" for k in same_name[:4])}?'
    return ''


def _type_problem(key: str, value, default) -> Optional[str]:
    if default is None:
        return None
    if value is None:
        if isinstance(default, (bool, int, float)) and key.split('.')[0] in STAGES:
            return 'a number is required'
        return None
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        # A kernel preference list may be narrowed to one kernel by name.
        ok = isinstance(value, (list, tuple)) or (
            key.endswith('attn_implementation') and isinstance(value, str))
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        return None
    return None if ok else f'expected {type(default).__name__} (the default is {default!r})'


def check_cfg_options(cfg, options: Optional[dict]) -> None:
    """Refuse ``--cfg-options`` keys the config does not have and values of
    another type than the ones they replace.

    Args:
        cfg: the config as loaded from its file.
        options: the parsed ``--cfg-options`` (dotted key -> value).

    Raises:
        ConfigError: naming the key, with the closest existing key or the
            expected type.
    """
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg
    variables = _placeholders(cfg)
    for key, value in (options or {}).items():
        parts, node = key.split('.'), cfg
        for depth, part in enumerate(parts):
            path = '.'.join(parts[:depth + 1])
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if isinstance(node, dict) and part in node:
                node = node[part]
                continue
            if depth == 0 and part in variables:
                if not isinstance(value, str):
                    raise ConfigError(f'--cfg-options {key}={value!r}: a path variable is a '
                                      'string')
                break
            addable = any(fnmatch.fnmatchcase(path, pattern) for pattern in ADDABLE)
            if (not addable and depth == 1 and parts[0] in BUILT_PARTS
                    and isinstance(node, dict) and 'type' in node):
                # An argument of the part's builder that the config leaves at its default.
                addable = _builder_accepts(node, part)
            if addable:
                break
            raise ConfigError(f'--cfg-options {key}: the config has no `{path}`'
                              f'{_suggestion(cfg, key)}')
        else:
            problem = _type_problem(key, value, node)
            if problem:
                raise ConfigError(f'--cfg-options {key}={value!r}: {problem}')


def apply_cfg_options(cfg, options: Optional[dict]) -> None:
    """Check then merge ``--cfg-options`` into ``cfg``."""
    if options:
        check_cfg_options(cfg, options)
        cfg.merge_from_dict(options)


# ---------------------------------------------------------------- resume drift

def _plain(value):
    return json.loads(json.dumps(value.to_dict() if hasattr(value, 'to_dict') else value))


def result_config(cfg, stage: str, processes: int, images: bool = True) -> dict:
    """The parts of the resolved config that change a stage's result: its
    recipe (optimizer, schedule, batch arithmetic, loss), its data, the model
    parts, the number of processes, and the GPU switches that change the
    arithmetic (TF32 matmuls, compiled layers). Logging, checkpoint cadence,
    workers and hooks are left out. ``images``: fingerprint the images the
    stage reads too (:func:`image_fingerprints`)."""
    recipe = _plain(cfg[stage])
    for key in ('num_workers', 'checkpoint_interval'):
        recipe.pop(key, None)
    parts = {stage: recipe, 'processes': processes}
    if isinstance(recipe.get('data'), str):
        parts[recipe['data']] = _plain(cfg.get(recipe['data']))
        parts[DATA_CHECKSUMS] = data_checksums(cfg.get(recipe['data']))
        if images and stage != 'proxy':  # the proxy stage reads the captions' text only
            parts[IMAGE_FINGERPRINTS] = image_fingerprints(cfg.get(recipe['data']))
    keys = ['model', 'llm', 'tokenizer', 'seed', 'synthetic_data', 'skip_nonfinite_steps',
            'strategy', 'mixed_precision', 'tf32', 'compile']
    if stage != 'proxy':
        keys += ['vision_tower', 'image_processor', 'pad_to_square', 'max_image_pixels']
    for key in keys:
        parts[key] = _plain(cfg.get(key))
    return parts


def data_checksums(data) -> Dict[str, str]:
    """sha256 of every data file of a dataset config, by path: an edited file
    (rows removed, as check_data suggests) changes what a resumed stage
    trains on, though its config is the same."""
    if not data:
        return {}
    checksums = {}
    for source in data_sources(data).values():
        for path in as_list(source.get('data_files') or []):
            if osp.isfile(path):
                checksums[path] = sha256_of(path)
    return checksums


def image_fingerprints(data) -> Dict[str, dict]:
    """What the images a dataset config's rows name looked like, per image
    folder: how many, their total size, and one digest, over the images'
    content (sha256) when they hold at most :data:`CONTENT_HASH_BYTES`, else
    over their sizes and modification times (``method``). Replacing an image
    (another picture, even of the same size) changes the digest; an image
    that is missing counts as such. Unreadable data files are left to the
    data checks."""
    if not data:
        return {}
    images = {}
    for source in data_sources(data).values():
        folder = source.get('image_folder') or ''
        for path in as_list(source.get('data_files') or []):
            try:
                rows = read_rows(path, [])
            except (OSError, ValueError):
                continue
            names = images.setdefault(osp.abspath(folder) if folder else '', set())
            names.update(row['image'] for _, row in rows
                         if isinstance(row, dict) and isinstance(row.get('image'), str))
    fingerprints = {}
    for folder, names in sorted(images.items()):
        if not names:
            continue
        stats = {}
        for name in sorted(names):
            try:
                stat = os.stat(osp.join(folder, name))
                stats[name] = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                stats[name] = None
        total = sum(s[0] for s in stats.values() if s)
        by_content = total <= CONTENT_HASH_BYTES
        digest = hashlib.sha256()
        for name, stat in stats.items():
            if stat is None:
                seen = 'missing'
            elif by_content:
                seen = sha256_of(osp.join(folder, name))
            else:
                seen = f'{stat[0]}:{stat[1]}'
            digest.update(f'{name}\t{seen}\n'.encode())
        fingerprints[folder or '.'] = dict(
            images=len(stats), bytes=total, method='sha256' if by_content else 'size+mtime',
            digest=digest.hexdigest())
    return fingerprints


def prepare_stage_start(cfg, stage: str, resume: bool, first_unfinished: bool,
                        processes: int, allow_config_change: bool = False,
                        inputs: Optional[Dict[str, str]] = None):
    """Decide how an unfinished stage starts, before any model loads.

    Without a checkpoint to resume, the stage starts fresh and its resolved
    config is saved. With one, the saved config is compared with this one.

    Args:
        cfg: the pipeline config.
        stage: the stage's name.
        resume: ``--resume`` was given.
        first_unfinished: this is the first stage of the run that is not
            finished, the one ``--resume`` is about.
        processes: the number of training processes.
        allow_config_change: resume even when the config changed.
        inputs: the checksum digests of the earlier stages' artifacts the
            stage is made from, by role: a resumed stage whose earlier stage
            was trained again since would mix the two.

    Returns:
        ``(resume, changes, current)``: whether the stage resumes, the allowed
        differences (``key -> [saved, current]``), and this run's resolved
        stage config, which the stage's manifest records.

    Raises:
        ConfigError: ``--resume`` finds no checkpoint of the stage to resume,
            or the config changed since the stage started.
    """
    stage_dir = osp.join(osp.abspath(cfg.work_dir), stage)
    saved_path = osp.join(stage_dir, STAGE_CONFIG)
    current = result_config(cfg, stage, processes)
    if inputs:
        current[INPUT_CHECKSUMS] = inputs
    checkpoint = latest_complete_checkpoint(stage_dir) if resume else None
    if resume and checkpoint is None and first_unfinished:
        raise ConfigError(f'--resume: stage {stage!r} has no intact checkpoint in {stage_dir} to '
                          'resume from; run without --resume to start it from the beginning')
    if checkpoint is None:
        if is_main_process():
            atomic_write(json.dumps(current, indent=2), saved_path)
        return False, {}, current
    if not osp.exists(saved_path):
        print_log(f'[{stage}] {saved_path} is missing (a work dir from an older version): the '
                  'config cannot be compared with the one the stage started with',
                  logger='current', level=logging.WARNING)
        return True, {}, current
    with open(saved_path, encoding='utf-8') as f:
        saved = json.load(f)
    compared = dict(current)
    for key in (DATA_CHECKSUMS, INPUT_CHECKSUMS, IMAGE_FINGERPRINTS):
        if key not in saved:  # saved by a version that did not record them
            compared.pop(key, None)
    changes = config_differences(saved, compared)
    if changes and not allow_config_change:
        listing = '\n'.join(f'  {key}: {old!r} -> {new!r}' for key, (old, new) in changes.items())
        raise ConfigError(
            f'--resume: the config of stage {stage!r} differs from the one it started with '
            f'({saved_path}), which changes the result of a resumed run:\n{listing}\nUndo the '
            'change, start the stage again without --resume, or pass --allow-config-change to '
            'resume anyway (the manifest records the change)')
    if changes:
        print_log(f'[{stage}] resuming with a changed config (--allow-config-change): '
                  + ', '.join(changes), logger='current', level=logging.WARNING)
    return True, changes, current


def record_config_changes(work_dir: str, stage: str, changes: Dict[str, list]) -> None:
    """Add the changes a resumed stage was allowed to its manifest."""
    if not changes or not is_main_process():
        return
    manifest = read_manifest(work_dir, stage)
    if manifest is not None:
        write_manifest(work_dir, stage, dict(manifest, config_changed_on_resume=changes))
