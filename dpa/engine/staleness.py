"""Finished stages made from artifacts that have changed since.

A finished stage is skipped on re-run. That is right only while the
artifacts it was made from are the ones it read: when an earlier stage is
trained again (its manifest removed, another learning rate), the later
stages' artifacts were made from the old one. Each manifest records the
checksum digest of every artifact it was made from
(``made_from.input_checksums``, by role); a finished stage whose inputs
differ, or whose earlier stage trains again in this run, is stale. A stale
stage is refused, naming it, unless the run is told to train it again
(``--rerun-stale``), which moves its folder aside first.
"""
import os
import time
from typing import Callable, Dict, Sequence

from dpa.artifacts import checksums_digest, read_manifest, stage_dir, stage_work_dir

INPUT_CHECKSUMS = 'input_checksums'


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
                 dependencies: Callable[[object, str], Dict[str, str]]) -> Dict[str, str]:
    """The finished stages of this work dir, among ``stages`` (in order),
    that are stale, each with the reason.

    Args:
        cfg: the pipeline config.
        stages: the training stages of the run, in order.
        dependencies: ``(cfg, stage) -> {role: earlier stage}``.
    """
    trains, stale = set(), {}
    for stage in stages:
        manifest = read_manifest(stage_work_dir(cfg, stage), stage)
        if manifest is None:
            trains.add(stage)
            continue
        if stage_work_dir(cfg, stage) != cfg.work_dir:
            continue  # another run's stage, used as it is
        recorded = (manifest.get('made_from') or {}).get(INPUT_CHECKSUMS)
        for role, previous in dependencies(cfg, stage).items():
            if previous in trains or previous in stale:
                stale[stage] = f'stage {previous!r}, whose {role} it was made from, trains again'
                break
            upstream = read_manifest(stage_work_dir(cfg, previous), previous)
            # Manifests of older versions record no input checksums.
            if isinstance(recorded, dict) and upstream is not None and \
                    recorded.get(role) != checksums_digest(upstream):
                stale[stage] = (f'the {role} of stage {previous!r} changed since it was made '
                                f'from it ({upstream["artifact"]}, finished '
                                f'{upstream.get("finished_at")})')
                break
    return stale


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
