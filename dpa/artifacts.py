"""Stage artifacts and manifests, written atomically: a reader sees either the
previous state or the complete new one, never a half-written directory. A stage
is finished exactly when its manifest exists; the manifest is written last.

A manifest stores paths relative to the work dir, so a copied or moved work
dir is self-contained, and the sha256 of every artifact file, which the next
stage verifies before it uses the artifact, as do the tools that load the
final model (:func:`verify_artifact_folder`).

It also records what the artifact was made from: the checksum digest of every
earlier artifact (``made_from.input_checksums``, by role). One function,
:func:`stale_reason`, says whether those artifacts are still the ones the work
dir holds; every reader applies it (the pipeline's plan through
:func:`changed_input`, the tools and the eval stage through
:func:`read_current_manifest`), so no reader trusts an artifact on its
existence alone (docs/architecture.md, "What a manifest records")."""
import contextlib
import hashlib
import json
import os
import os.path as osp
import shutil
import time
from typing import Callable, Dict, Optional, Tuple

MANIFEST = 'manifest.json'
ARTIFACT_DIR = 'artifact'
INPUT_CHECKSUMS = 'input_checksums'
# What the pipeline reads from a manifest: without them it is not one.
MANIFEST_KEYS = ('artifact', 'artifact_kind', 'made_from', 'iterations', 'first_loss',
                 'last_loss')


class ArtifactError(RuntimeError):
    """A finished stage's manifest or artifact cannot be trusted.

    Args:
        problem: what is wrong, naming the file.
        work_dir: the pipeline's work dir.
        stage: the stage that wrote it.
    """

    def __init__(self, problem: str, work_dir: str, stage: str):
        self.problem, self.work_dir, self.stage = problem, work_dir, stage
        super().__init__(self.explain())

    def explain(self, config: str = 'CONFIG') -> str:
        """The problem and the commands that re-run the stage."""
        folder = stage_dir(self.work_dir, self.stage)
        return (f'{self.problem}. Re-run stage {self.stage!r}: move {folder} aside, then\n'
                f'  python tools/train.py {config} --stage {self.stage} '
                f'--work-dir {self.work_dir}')


class StaleArtifactError(ArtifactError):
    """A finished stage was made from an earlier artifact that has changed
    since (an earlier stage trained again): its artifact belongs to the old one."""

    def explain(self, config: str = 'CONFIG') -> str:
        return (f'stage {self.stage!r} in {self.work_dir} is stale: {self.problem}. Train it '
                f'again:\n  python tools/train.py {config} --work-dir {self.work_dir} '
                '--rerun-stale')


def stage_dir(work_dir: str, stage: str) -> str:
    return osp.join(work_dir, stage)


def stage_work_dir(cfg, stage: str) -> str:
    """Where ``stage``'s manifest and artifact are: this run's work dir, or
    ``<stage>.from_work_dir``, a finished stage of another run used as it is
    (e.g. one proxy shared by several ablations of one seed)."""
    return (cfg.get(stage) or {}).get('from_work_dir') or cfg.work_dir


def manifest_path(work_dir: str, stage: str) -> str:
    return osp.join(stage_dir(work_dir, stage), MANIFEST)


def read_manifest(work_dir: str, stage: str, verify: bool = False) -> Optional[dict]:
    """The manifest of a finished stage (None: not finished), its paths absolute.

    Args:
        work_dir: the pipeline's work dir.
        stage: the stage's name.
        verify: also check every artifact file against its recorded sha256
            (before a later stage uses the artifact).

    Raises:
        ArtifactError: the manifest is not valid json, lacks keys, or its
            artifact is missing or (``verify``) changed since it was written.
    """
    path = manifest_path(work_dir, stage)
    if not osp.exists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            manifest = json.load(f)
    except (ValueError, OSError) as err:
        raise ArtifactError(f'{path} is not a readable manifest ({err})', work_dir,
                            stage) from None
    missing = [key for key in MANIFEST_KEYS
               if not isinstance(manifest, dict) or key not in manifest]
    if missing or not isinstance(manifest.get('artifact'), str):
        raise ArtifactError(f'{path} is not a complete manifest (missing {missing or "artifact"})',
                            work_dir, stage)
    manifest = dict(manifest, artifact=resolve_path(work_dir, manifest['artifact']))
    if isinstance(manifest['made_from'], dict):
        manifest['made_from'] = {
            key: resolve_path(work_dir, value) if key in ARTIFACT_ROLES else value
            for key, value in manifest['made_from'].items()}
    if not osp.isdir(manifest['artifact']):
        raise ArtifactError(f'the artifact {manifest["artifact"]} named by {path} does not exist',
                            work_dir, stage)
    if verify:
        verify_checksums(manifest, work_dir, stage)
    return manifest


def verify_checksums(manifest: dict, work_dir: str, stage: str, under: str = '') -> None:
    """Check the artifact files (those under the folder ``under`` of the
    artifact, when given) against the sha256 the manifest recorded.

    Raises:
        ArtifactError: a listed file is missing or changed.
    """
    path = manifest_path(work_dir, stage)
    prefix = under.rstrip(os.sep) + os.sep if under else ''
    for name, digest in (manifest.get('checksums') or {}).items():
        if not name.startswith(prefix):
            continue
        file = osp.join(manifest['artifact'], name)
        if not osp.isfile(file):
            raise ArtifactError(f'{file}, listed in {path}, is missing', work_dir, stage)
        if sha256_of(file) != digest:
            raise ArtifactError(f'{file} does not match the sha256 recorded in {path} '
                                '(changed or corrupted since the stage wrote it)', work_dir,
                                stage)


def verify_artifact_folder(folder: str) -> bool:
    """Check a stage's artifact folder, or a folder inside it (the final
    model's ``hf_llava``), against the manifest of the stage that wrote it;
    False when no manifest covers it (e.g. a model copied out of its work
    dir), so there is nothing to check against.

    Raises:
        ArtifactError: the manifest is unreadable or a file changed.
        StaleArtifactError: the stage is stale (:func:`stale_reason`).
    """
    artifact, inner = osp.abspath(folder), ''
    while osp.basename(artifact) != ARTIFACT_DIR:
        parent = osp.dirname(artifact)
        if parent == artifact:
            return False
        inner = osp.join(osp.basename(artifact), inner) if inner else osp.basename(artifact)
        artifact = parent
    stage_folder = osp.dirname(artifact)
    work_dir, stage = osp.dirname(stage_folder), osp.basename(stage_folder)
    manifest = read_manifest(work_dir, stage)
    if manifest is None or osp.abspath(manifest['artifact']) != artifact:
        return False
    verify_checksums(manifest, work_dir, stage, inner)
    reason = stale_reason(manifest)
    if reason is not None:
        raise StaleArtifactError(reason, work_dir, stage)
    return True


def _artifact_stage(path) -> Optional[Tuple[str, str]]:
    """``(work dir, stage)`` of a ``<work dir>/<stage>/artifact`` path."""
    if not isinstance(path, str) or osp.basename(osp.normpath(path)) != ARTIFACT_DIR:
        return None
    folder = osp.dirname(osp.normpath(path))
    return osp.dirname(folder), osp.basename(folder)


def changed_input(manifest: dict, sources: Optional[Dict[str, Tuple[str, str]]] = None
                  ) -> Optional[str]:
    """Why a finished stage no longer matches the earlier artifacts it was
    made from (None: it matches, or its manifest, of an older version,
    records no input checksums).

    Args:
        manifest: the stage's manifest (from :func:`read_manifest`).
        sources: role -> ``(work dir, stage)`` of the artifact that counts now
            (the pipeline passes its config's); default: where the manifest
            says the artifact was.
    """
    made_from = manifest.get('made_from') or {}
    recorded = made_from.get(INPUT_CHECKSUMS)
    if not isinstance(recorded, dict):
        return None
    for role, digest in recorded.items():
        where = (sources or {}).get(role) if sources is not None else _artifact_stage(
            made_from.get(role))
        if where is None:
            continue
        work_dir, stage = where
        upstream = read_manifest(work_dir, stage)
        if upstream is None:
            if sources is None and osp.isdir(stage_dir(work_dir, stage)):
                return (f'stage {stage!r}, whose {role} it was made from, has no finished '
                        f'manifest now ({manifest_path(work_dir, stage)} is missing: it is being '
                        'trained again, or was stopped)')
            continue
        if checksums_digest(upstream) != digest:
            return (f'the {role} of stage {stage!r} changed since it was made from it '
                    f'({upstream["artifact"]}, finished {upstream.get("finished_at")})')
    return None


def stale_reason(manifest: dict, _seen: Tuple[str, ...] = ()) -> Optional[str]:
    """:func:`changed_input` of a stage and, in turn, of every earlier stage
    it was made from: a model made from a stale projector is stale too."""
    reason = changed_input(manifest)
    if reason is not None:
        return reason
    made_from = manifest.get('made_from') or {}
    for role in made_from.get(INPUT_CHECKSUMS) or {}:
        where = _artifact_stage(made_from.get(role))
        if where is None or osp.abspath(stage_dir(*where)) in _seen:
            continue
        upstream = read_manifest(*where)
        deeper = upstream and stale_reason(upstream, _seen + (osp.abspath(stage_dir(*where)), ))
        if deeper:
            return f'stage {where[1]!r}, whose {role} it was made from, is stale: {deeper}'
    return None


def read_current_manifest(work_dir: str, stage: str, verify: bool = True) -> Optional[dict]:
    """:func:`read_manifest`, refusing a stage that is stale (see
    :func:`stale_reason`): what every reader of a finished stage's artifact
    calls before it uses it.

    Raises:
        ArtifactError: as :func:`read_manifest`.
        StaleArtifactError: the stage was made from an artifact that changed since.
    """
    manifest = read_manifest(work_dir, stage, verify=verify)
    if manifest is not None:
        reason = stale_reason(manifest)
        if reason is not None:
            raise StaleArtifactError(reason, work_dir, stage)
    return manifest


def checksums_digest(manifest: dict) -> str:
    """One sha256 over a manifest's artifact checksums: what a later stage
    records of the artifact it was made from."""
    listing = json.dumps(manifest.get('checksums') or {}, sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()


# made_from keys that hold paths of earlier stages' artifacts.
ARTIFACT_ROLES = ('llm_adapter', 'projector', 'model')


def resolve_path(work_dir: str, path):
    """A manifest's path as an absolute one.

    Relative paths are relative to the work dir. Absolute ones (manifests
    written before paths were relative) are taken as they are, except that a
    ``<stage>/artifact`` that this work dir holds itself wins: a copied work
    dir must not use the original's artifacts, nor a moved one fail.
    """
    if not isinstance(path, str):
        return path
    work_dir = osp.abspath(work_dir)
    if not osp.isabs(path):
        return osp.normpath(osp.join(work_dir, path))
    parts = osp.normpath(path).split(os.sep)
    if len(parts) >= 2 and parts[-1] == ARTIFACT_DIR:
        own = osp.join(work_dir, parts[-2], ARTIFACT_DIR)
        if osp.isdir(own):
            return own
    return path


def relative_path(work_dir: str, path):
    """``path`` relative to the work dir when it lies inside it."""
    if not isinstance(path, str) or not osp.isabs(path):
        return path
    relative = osp.relpath(path, osp.abspath(work_dir))
    return path if relative.startswith(os.pardir) else relative


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def directory_checksums(folder: str) -> Dict[str, str]:
    """sha256 of every file under ``folder``, by path relative to it."""
    checksums = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = osp.join(root, name)
            checksums[osp.relpath(path, folder)] = sha256_of(path)
    return dict(sorted(checksums.items()))


def write_artifact_dir(final_dir: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_dir)`` then move the result to ``final_dir`` by rename."""
    tmp_dir = f'{final_dir}.tmp-{os.getpid()}'
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        write(tmp_dir)
    except Exception:  # e.g. a full disk: leave nothing behind on it
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    # A leftover from a run killed between this rename and its manifest.
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp_dir, final_dir)
    return final_dir


def atomic_write(data, path: str) -> None:
    """Write bytes or text to ``path`` through a temporary file and a rename."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except Exception:  # e.g. a full disk: leave nothing behind on it
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_manifest(work_dir: str, stage: str, manifest: dict) -> str:
    """Write the stage's manifest last, atomically: paths inside the work dir
    become relative to it, and the artifact's files get their sha256."""
    path = manifest_path(work_dir, stage)
    artifact = manifest.get('artifact')
    if isinstance(artifact, str) and osp.isdir(artifact) and 'checksums' not in manifest:
        manifest = dict(manifest, checksums=directory_checksums(artifact))
    manifest = dict(manifest, stage=stage, finished_at=time.strftime('%Y-%m-%d %H:%M:%S'),
                    artifact=relative_path(work_dir, artifact))
    if isinstance(manifest.get('made_from'), dict):
        manifest['made_from'] = {
            key: relative_path(work_dir, value) if key in ARTIFACT_ROLES else value
            for key, value in manifest['made_from'].items()}
    atomic_write(json.dumps(manifest, indent=2), path)
    return path
