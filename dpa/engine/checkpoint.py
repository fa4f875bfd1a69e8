"""Checkpoints that survive being killed, and mmengine's resume on new torch.

- mmengine's local file backend writes checkpoints in place: a process killed
  mid-write leaves a truncated ``iter_N.pth``. Here every write goes to a
  temporary file that is renamed into place, so a checkpoint under its final
  name is always complete.
- ``torch.load`` defaults to ``weights_only=True`` on torch >= 2.6 and rejects
  the HistoryBuffer and numpy objects mmengine stores in checkpoints. The runner
  only loads checkpoints this project wrote into its own work directory, so
  they are loaded in full.
"""
import glob
import os.path as osp
import re
import zipfile
from typing import Optional

import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.runner import CheckpointLoader

from dpa.engine.artifacts import atomic_write


class AtomicLocalBackend(LocalBackend):
    """mmengine's local backend with writes that are all-or-nothing."""

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(obj, str(filepath))

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write(obj.encode(encoding), str(filepath))


def _load_local(filename, map_location=None):
    return torch.load(filename, map_location=map_location, weights_only=False)


def register_checkpoint_io():
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local, force=True)


def latest_complete_checkpoint(stage_dir: str) -> Optional[str]:
    """The newest ``iter_N.pth`` in ``stage_dir`` that is a complete file.

    mmengine's ``last_checkpoint`` pointer is not used: it is written in place
    after the checkpoint, so a kill can leave it empty or pointing at a file a
    non-atomic writer had not finished. torch checkpoints are zip archives whose
    directory sits at the end, so a truncated one fails ``is_zipfile``.
    """
    def iteration(path):
        return int(re.search(r'iter_(\d+)\.pth$', path).group(1))

    for path in sorted(glob.glob(osp.join(stage_dir, 'iter_*.pth')), key=iteration,
                       reverse=True):
        if zipfile.is_zipfile(path):
            return path
    return None
