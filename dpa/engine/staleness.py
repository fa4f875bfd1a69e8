"""Finished stages that this run would make differently.

A finished stage is skipped on re-run. That is right only while it is what
this run would make:

- the artifacts it was made from are the ones it read: when an earlier stage
  is trained again (its manifest removed, another learning rate), the later
  stages' artifacts were made from the old one. Each manifest records the
  checksum digest of every artifact it was made from
  (``made_from.input_checksums``, by role), compared by
  :func:`dpa.artifacts.changed_input`, the check every reader applies;
- the config that made it is this run's: each manifest records the stage's
  resolved config (``stage_config``: recipe, loss, ``use_proxy``, data and
  the sha256 of its files, model parts, seed; see
  :func:`dpa.engine.config_guard.result_config`), compared key by key, less
  the keys of how it ran (:data:`HOW_IT_RAN`). Another config reusing a
  finished work dir (an ablation pointed at a DPA run) is told so.

A stale stage is refused, naming it and the difference, unless the run is
told to train it again (``--rerun-stale``), which moves its folder aside
first. A manifest written before ``stage_config`` was recorded is trusted
with a warning: nothing says what made it.
"""
import fnmatch
import logging
import os
import time
from typing import Callable, Dict, Optional, Sequence

from mmengine.logging import print_log

from dpa.artifacts import (INPUT_CHECKSUMS, changed_input, checksums_digest, read_manifest,
                           stage_dir, stage_work_dir)

STAGE_CONFIG_KEY = 'stage_config'
IMAGE_FINGERPRINTS = 'image_fingerprints'
# Keys of a stage's resolved config that say how it ran, not what it made: a
# finished stage is not trained again for them (the input checksums and the
# images are compared on their own: the checksums above, the images on --resume).
HOW_IT_RAN = ('processes', 'strategy', 'strategy.*', 'mixed_precision', 'mixed_precision.*',
              'tf32', 'compile', 'compile.*', '*attn_implementation', '*attn_implementation.*',
              INPUT_CHECKSUMS, f'{INPUT_CHECKSUMS}.*', IMAGE_FINGERPRINTS,
              f'{IMAGE_FINGERPRINTS}.*')


def _flatten(node, prefix: str = '') -> Dict[str, object]:
    if isinstance(node, dict) and node:
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f'{prefix}{key}.'))
        return flat
    return {prefix[:-1]: node}


def config_differences(saved: dict, current: dict) -> Dict[str, list]:
    """``key -> [saved, current]`` for every dotted key whose value differs."""
    before, after = _flatten(saved), _flatten(current)
    return {key: [before.get(key), after.get(key)] for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)}


def made_differently(recorded: dict, current: dict) -> Dict[str, list]:
    """The differences of two stage configs that change what the stage makes."""
    return {key: change for key, change in config_differences(recorded, current).items()
            if not any(fnmatch.fnmatchcase(key, pattern) for pattern in HOW_IT_RAN)}


def describe_differences(changes: Dict[str, list], most: int = 8) -> str:
    listing = [f'{key}: {old!r} -> {new!r}' for key, (old, new) in changes.items()]
    if len(listing) > most:
        listing = listing[:most] + [f'... {len(changes) - most} more']
    return '; '.join(listing)


class StaleStagesError(RuntimeError):
    """Finished stages were made from artifacts that changed since.

    Args:
        stale: stage -> why it is stale.
        work_dir: the pipeline's work dir.
    """

    def __init__(self, stale: Dict[str, str], work_dir: str):
        self.stale, self.work_dir = stale, work_dir
        super().__init__(self.explain())

    def explain(self, command: str = 'python tools/train.py CONFIG') -> str:
        """The stale stages and the command that trains them again."""
        reasons = '\n'.join(f'  {stage}: {why}' for stage, why in self.stale.items())
        return (f'stale stage(s) {", ".join(self.stale)}: finished, but made from artifacts '
                f'that changed since, so skipping them would keep results of the old ones:\n'
                f'{reasons}\nTrain them again (their folders are moved aside to '
                f'<stage>.stale-<time> first):\n  {command} --work-dir {self.work_dir} '
                '--rerun-stale')


def stale_stages(cfg, stages: Sequence[str],
                 dependencies: Callable[[object, str], Dict[str, str]],
                 made_by: Optional[Callable[[object, str], dict]] = None) -> Dict[str, str]:
    """The finished stages of this work dir, among ``stages`` (in order),
    that are stale, each with the reason.

    Args:
        cfg: the pipeline config.
        stages: the training stages of the run, in order.
        dependencies: ``(cfg, stage) -> {role: earlier stage}``.
        made_by: ``(cfg, stage) -> the stage's resolved config``, compared
            with the one its manifest records (None: not compared).
    """
    trains, stale = set(), {}
    for stage in stages:
        manifest = read_manifest(stage_work_dir(cfg, stage), stage)
        if manifest is None:
            trains.add(stage)
            continue
        if stage_work_dir(cfg, stage) != cfg.work_dir:
            continue  # another run's stage, used as it is
        deps = dependencies(cfg, stage)
        again = [(role, previous) for role, previous in deps.items()
                 if previous in trains or previous in stale]
        if again:
            role, previous = again[0]
            stale[stage] = f'stage {previous!r}, whose {role} it was made from, trains again'
            continue
        reason = changed_input(manifest, {role: (stage_work_dir(cfg, previous), previous)
                                          for role, previous in deps.items()})
        if reason is None and made_by is not None:
            reason = _config_change(manifest, made_by(cfg, stage), stage)
        if reason is not None:
            stale[stage] = reason
    return stale


def _config_change(manifest: dict, current: dict, stage: str) -> Optional[str]:
    recorded = manifest.get(STAGE_CONFIG_KEY)
    if not isinstance(recorded, dict):
        print_log(f'[{stage}] {os.path.dirname(manifest["artifact"])} was finished by an older '
                  'version, whose manifest does not record the config '
                  'that made it: it is used as it is, though this config may make it '
                  'differently (move the folder aside to train it again)', logger='current',
                  level=logging.WARNING)
        return None
    changes = made_differently(recorded, current)
    if not changes:
        return None
    return f'made by another config than this one ({describe_differences(changes)})'


def set_aside(work_dir: str, stages: Sequence[str]) -> Dict[str, str]:
    """Move each stage's folder to ``<stage>.stale-<time>``; return the new paths."""
    stamp = time.strftime('%Y%m%d-%H%M%S')
    moved = {}
    for stage in stages:
        target = f'{stage_dir(work_dir, stage)}.stale-{stamp}'
        os.replace(stage_dir(work_dir, stage), target)
        moved[stage] = target
    return moved


def input_checksums(manifests: Dict[str, dict]) -> Dict[str, str]:
    """What a stage records of the artifacts it is made from, by role."""
    return {role: checksums_digest(manifest) for role, manifest in manifests.items()}
