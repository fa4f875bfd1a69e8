"""Checkpoints that survive being killed, and mmengine's resume on new torch.

- mmengine's local file backend writes checkpoints in place: a process killed
  mid-write leaves a truncated ``iter_N.pth``. Here every write goes to a
  temporary file that is renamed into place, so a checkpoint under its final
  name is always complete.
- A checkpoint is a pickle, and unpickling can run any code: a crafted
  ``iter_N.pth`` in a work dir someone hands over (a shared cluster folder, a
  colleague's run) would run it as whoever resumes. Checkpoints are loaded
  with ``weights_only=True`` and an allow-list of exactly the types mmengine
  stores beside tensors (:data:`MMENGINE_CHECKPOINT_GLOBALS`: its
  ``HistoryBuffer``, numpy arrays and scalars); anything else is refused with
  :class:`UnsafeCheckpointError`, naming the file. (torch >= 2.6 defaults to
  ``weights_only=True`` and, without the allow-list, rejects every mmengine
  checkpoint.)
- ``torch.load`` does not check the CRCs of the zip archive it reads: a
  checkpoint with flipped bytes loads silently with wrong weights. Each
  checkpoint gets a ``.sha256`` sidecar, written after it; resume verifies it
  (or, without a sidecar, the archive's CRCs) and falls back to the previous
  checkpoint, with a logged message.
"""
import glob
import hashlib
import logging
import os
import os.path as osp
import pickle
import re
import zipfile
from typing import Optional

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner import CheckpointLoader

from dpa.artifacts import atomic_write, sha256_of

CHECKSUM_SUFFIX = '.sha256'


class AtomicLocalBackend(LocalBackend):
    """mmengine's local backend with writes that are all-or-nothing, and a
    sha256 sidecar beside every checkpoint."""

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(obj, str(filepath))
        if str(filepath).endswith('.pth'):
            # Written after the checkpoint: a kill in between leaves a
            # checkpoint without sidecar, checked by its zip CRCs instead.
            atomic_write(hashlib.sha256(obj).hexdigest() + '\n', str(filepath) + CHECKSUM_SUFFIX)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write(obj.encode(encoding), str(filepath))

    def remove(self, filepath) -> None:
        super().remove(filepath)
        if osp.exists(str(filepath) + CHECKSUM_SUFFIX):
            os.remove(str(filepath) + CHECKSUM_SUFFIX)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds an object outside :data:`MMENGINE_CHECKPOINT_GLOBALS`."""


HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_statistic(owner, name: str):
    """The one ``getattr`` an mmengine checkpoint makes: a ``HistoryBuffer``
    pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``.
    Any other attribute of any other object is refused (a free ``getattr``
    reaches the builtins module)."""
    if owner is HistoryBuffer and name in HISTORY_BUFFER_STATISTICS + tuple(
            HistoryBuffer._statistics_methods):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'getattr({getattr(owner, "__name__", owner)!r}, {name!r}) '
                                 'is not a HistoryBuffer statistic')


_NUMPY_CORE = 'numpy._core' if hasattr(np, '_core') else 'numpy.core'
_multiarray = __import__(f'{_NUMPY_CORE}.multiarray', fromlist=['_reconstruct'])
# What torch.serialization.get_unsafe_globals_in_checkpoint finds in the
# checkpoints mmengine 0.10.7 writes (message hub: HistoryBuffer, numpy
# arrays and scalars), under both numpy 1.x and 2.x names; numeric dtype
# classes, which numpy >= 1.25 may name in a pickle.
MMENGINE_CHECKPOINT_GLOBALS = [
    HistoryBuffer, np.ndarray, np.dtype,
    (_history_buffer_statistic, 'builtins.getattr'),
    *[(_multiarray._reconstruct, f'{core}.multiarray._reconstruct')
      for core in ('numpy._core', 'numpy.core')],
    *[(_multiarray.scalar, f'{core}.multiarray.scalar') for core in ('numpy._core', 'numpy.core')],
    *[getattr(np.dtypes, name) for name in dir(np.dtypes)
      if name.endswith('DType') and name not in ('ObjectDType', 'VoidDType')],
]


def load_checkpoint_file(filename, map_location=None):
    """``torch.load`` restricted to what an mmengine checkpoint holds.

    Raises:
        UnsafeCheckpointError: the file holds any other type (a pickle that
            would run code, or objects of another program); it names the file.
    """
    try:
        with torch.serialization.safe_globals(MMENGINE_CHECKPOINT_GLOBALS):
            return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r'GLOBAL ([\w.]+)', str(err))
        detail = re.search(r'WeightsUnpickler error:\s*(.+)', str(err))
        what = (f'`{found.group(1)}`' if found else detail.group(1).strip() if detail
                else str(err).splitlines()[0])
        raise UnsafeCheckpointError(
            f'refusing to load checkpoint {filename}: it holds {what}, which is not one of the '
            'types an mmengine checkpoint of this project stores, and loading it could run '
            'code. If you did not write it, delete it (and its .sha256) and resume from an '
            'earlier checkpoint, or start the stage again without --resume') from None


def _load_local(filename, map_location=None):
    return load_checkpoint_file(filename, map_location)


def register_checkpoint_io():
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local, force=True)


# Verdicts by (path, size, mtime): a checkpoint of many GB is hashed once a run.
_verdicts = {}


def _file_key(path: str):
    stat = os.stat(path)
    sidecar = path + CHECKSUM_SUFFIX
    return (path, stat.st_size, stat.st_mtime_ns,
            os.stat(sidecar).st_mtime_ns if osp.exists(sidecar) else None)


def checkpoint_problem(path: str) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be trusted, or None when it can."""
    if not zipfile.is_zipfile(path):
        return 'not a complete zip archive (truncated?)'
    sidecar = path + CHECKSUM_SUFFIX
    if osp.exists(sidecar):
        with open(sidecar) as f:
            expected = f.read().strip()
        if sha256_of(path) != expected:
            return f'its sha256 differs from the one in {osp.basename(sidecar)}'
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f'unreadable zip archive ({err})'
    return None if bad_member is None else f'CRC error in {bad_member}'


def latest_complete_checkpoint(stage_dir: str) -> Optional[str]:
    """The newest ``iter_N.pth`` in ``stage_dir`` that is complete and intact.

    mmengine's ``last_checkpoint`` pointer is not used: it is written in place
    after the checkpoint, so a kill can leave it empty or pointing at a file a
    non-atomic writer had not finished. Each newer checkpoint that fails its
    check (truncated, or bytes changed: see :func:`checkpoint_problem`) is
    skipped with a logged warning.
    """
    def iteration(path):
        return int(re.search(r'iter_(\d+)\.pth$', path).group(1))

    for path in sorted(glob.glob(osp.join(stage_dir, 'iter_*.pth')), key=iteration,
                       reverse=True):
        key = _file_key(path)
        known = key in _verdicts
        if not known:
            _verdicts[key] = checkpoint_problem(path)
        problem = _verdicts[key]
        if problem is None:
            return path
        if not known:
            print_log(f'skipping checkpoint {path}: {problem}; trying the previous one',
                      logger='current', level=logging.WARNING)
    return None
