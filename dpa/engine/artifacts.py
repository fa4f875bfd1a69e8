"""Stage artifacts and manifests, written atomically: a reader sees either the
previous state or the complete new one, never a half-written directory. A stage
is finished exactly when its manifest exists; the manifest is written last."""
import json
import os
import os.path as osp
import shutil
import time
from typing import Callable, Optional

MANIFEST = 'manifest.json'
ARTIFACT_DIR = 'artifact'


def stage_dir(work_dir: str, stage: str) -> str:
    return osp.join(work_dir, stage)


def manifest_path(work_dir: str, stage: str) -> str:
    return osp.join(stage_dir(work_dir, stage), MANIFEST)


def read_manifest(work_dir: str, stage: str) -> Optional[dict]:
    path = manifest_path(work_dir, stage)
    if not osp.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_artifact_dir(final_dir: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_dir)`` then move the result to ``final_dir`` by rename."""
    tmp_dir = f'{final_dir}.tmp-{os.getpid()}'
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    write(tmp_dir)
    # A leftover from a run killed between this rename and its manifest.
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp_dir, final_dir)
    return final_dir


def atomic_write(data, path: str) -> None:
    """Write bytes or text to ``path`` through a temporary file and a rename."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(work_dir: str, stage: str, manifest: dict) -> str:
    path = manifest_path(work_dir, stage)
    manifest = dict(manifest, stage=stage, finished_at=time.strftime('%Y-%m-%d %H:%M:%S'))
    atomic_write(json.dumps(manifest, indent=2), path)
    return path
