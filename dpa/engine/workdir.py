"""One run at a time in a work dir, and what interrupted runs left there.

Two runs writing one work dir would share its logs, overwrite each other's
checkpoints and point manifests at each other's artifacts. The first run
holds a lock file naming its process (pid, host, start time, command line);
a second one stops at once, naming it. A lock whose process is gone (killed,
machine rebooted) is taken over with a log line.

Atomic writes go through ``<name>.tmp-<pid>`` files and folders
(:mod:`dpa.artifacts`); a killed writer leaves them behind, on a disk
that may be full. The run that takes the lock removes those whose process is
no longer running.
"""
import contextlib
import json
import logging
import os
import os.path as osp
import re
import shutil
import socket
import sys
import time
from typing import List, Optional

from mmengine.logging import print_log

LOCK_FILE = '.dpa_run.lock'
TEMP_NAME = re.compile(r'\.tmp-(\d+)$')
# Where each launcher tells a process its rank before the process group exists.
RANK_VARIABLES = {'pytorch': 'RANK', 'slurm': 'SLURM_PROCID', 'mpi': 'OMPI_COMM_WORLD_RANK'}


class WorkDirError(RuntimeError):
    """The work dir cannot be used (not a directory, not writable)."""


class WorkDirBusy(WorkDirError):
    """Another run is using the work dir."""


def launch_rank(launcher: str) -> int:
    """This process's rank, from the launcher's environment."""
    variable = RANK_VARIABLES.get(launcher)
    return int(os.environ.get(variable, 0)) if variable else 0


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), which tells
    a live process from a new one that reuses its pid."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: Optional[str] = None) -> bool:
    """Whether process ``pid`` (started at ``start``, when known) still runs here."""
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    except (OverflowError, ValueError):
        return False
    now = _process_start(pid)
    return start is None or now is None or now == start


def _describe(holder: dict) -> str:
    return (f"process {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')} ({holder.get('command', '?')})")


def _read_lock(path: str) -> Optional[dict]:
    try:
        with open(path, encoding='utf-8') as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: nobody can be shown to hold it


def acquire_lock(work_dir: str) -> str:
    """Take the work dir's lock for this process.

    Raises:
        WorkDirBusy: a live process holds it (or one on another host, whose
            liveness cannot be checked from here).
        WorkDirError: ``work_dir`` is a file, or cannot be created or written.
    """
    if osp.exists(work_dir) and not osp.isdir(work_dir):
        raise WorkDirError(f'--work-dir {work_dir} is a file, not a directory: choose another '
                           '--work-dir')
    try:
        os.makedirs(work_dir, exist_ok=True)
        return _take_lock(work_dir)
    except OSError as err:
        # Read-only, permissions, a file where a parent folder should be.
        raise WorkDirError(f'cannot write to the work dir {work_dir} ({err.strerror}): make it '
                           'writable or choose another --work-dir') from None


def _take_lock(work_dir: str) -> str:
    path = osp.join(work_dir, LOCK_FILE)
    me = dict(pid=os.getpid(), host=socket.gethostname(), start=_process_start(os.getpid()),
              started=time.strftime('%Y-%m-%d %H:%M:%S'), command=' '.join(sys.argv))
    for _ in range(3):
        # Written whole, then linked into place: a lock is never seen half-written.
        tmp = f'{path}.tmp-{os.getpid()}'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(me, f)
        try:
            os.link(tmp, path)
            return path
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
        holder = _read_lock(path)
        if holder is None:
            continue  # released meanwhile
        pid = holder.get('pid')
        same_host = holder.get('host') == me['host']
        if (same_host and isinstance(pid, int) and process_alive(pid, holder.get('start'))) or (
                holder and not same_host):
            raise WorkDirBusy(
                f'{work_dir} is in use by {_describe(holder)}. Wait for it to finish or choose '
                f'another --work-dir; if that process is gone, delete {path}')
        print_log(f'taking over the stale lock {path} of {_describe(holder)}: that process is '
                  'no longer running', logger='current', level=logging.WARNING)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    raise WorkDirBusy(f'could not take the lock {path}: other runs keep taking it')


def release_lock(path: str) -> None:
    holder = _read_lock(path)
    if holder and holder.get('pid') == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_stale_temp_files(work_dir: str) -> List[str]:
    """Remove the ``*.tmp-<pid>`` files and folders of writers no longer
    running, each with a log line; return their paths."""
    removed = []
    for root, dirs, files in os.walk(work_dir):
        for name in sorted(dirs + files):
            match = TEMP_NAME.search(name)
            if match is None or process_alive(int(match.group(1))):
                continue
            path = osp.join(root, name)
            if osp.isdir(path) and not osp.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            removed.append(path)
            print_log(f'removed {path}, left by an interrupted write of process '
                      f'{match.group(1)}', logger='current', level=logging.WARNING)
    return removed


@contextlib.contextmanager
def work_dir_lock(work_dir: str, launcher: str = 'none'):
    """Hold the work dir's lock for the run (on rank 0, the one that writes
    artifacts; the other ranks of the run are its own) and clean up what
    interrupted writes left."""
    if launch_rank(launcher) != 0:
        yield
        return
    path = acquire_lock(work_dir)
    try:
        remove_stale_temp_files(work_dir)
        yield
    finally:
        release_lock(path)
