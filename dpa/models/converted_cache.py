"""Checkpoints converted once from another format into transformers folders.

A GGUF file (the LLM of the real-weights demo) or an ONNX file (its vision
tower) is converted on first use into a folder named by the source file's name
and sha256, under a cache root of its own. The folder is written aside and
moved into place whole, with a record (``dpa_conversion.json``) of its source
and of the sha256 of every file it holds. Every later use checks the folder
against that record before loading from it, as a stage's artifact is checked
against its manifest: a folder that was damaged, half-copied or written by
something else is refused with the folder to delete, never loaded.
"""
import functools
import hashlib
import json
import os
import os.path as osp
import shutil
import tempfile
from typing import Callable, Dict

from mmengine.logging import print_log

from dpa.errors import ConfigError

RECORD = 'dpa_conversion.json'


class ConversionError(ConfigError):
    """A source file that cannot be converted, or a converted folder that
    cannot be trusted, with the reason and the fix (a ConfigError: the tools
    print it as one, before training starts)."""


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """The sha256 of a file, computed once per process for each (size, mtime)."""
    stat = os.stat(path)
    return _sha256(osp.abspath(path), stat.st_size, stat.st_mtime_ns)


def converted_dir(source: str, root: str) -> str:
    """Where the conversion of ``source`` lives under ``root`` (whether or not
    it exists yet): named by the file's name and content hash."""
    stem = osp.splitext(osp.basename(source))[0]
    return osp.join(root, f'{stem}-{file_sha256(source)[:16]}')


def _folder_checksums(folder: str) -> Dict[str, str]:
    return {name: file_sha256(osp.join(folder, name)) for name in sorted(os.listdir(folder))
            if name != RECORD and osp.isfile(osp.join(folder, name))}


def check_converted(directory: str) -> dict:
    """The record of a converted folder, after checking every file against it.

    Raises:
        ConversionError: the record is missing or unreadable, or a file is
            missing, added or changed since the conversion; names the folder
            to delete (the next run converts the source again).
    """
    fix = f'delete the folder {directory} and run again: the source is converted anew'
    try:
        with open(osp.join(directory, RECORD), encoding='utf-8') as f:
            record = json.load(f)
        expected = dict(record['files'])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConversionError(f'{directory} is not a complete converted checkpoint (no readable '
                              f'{RECORD}): {fix}') from None
    found = _folder_checksums(directory)
    if found != expected:
        changed = sorted(name for name in set(found) | set(expected)
                         if found.get(name) != expected.get(name))
        raise ConversionError(f'the converted checkpoint in {directory} is damaged ({", ".join(changed)} '
                              f'differ from the checksums written at conversion): {fix}')
    return record


def converted_checkpoint(source: str, root: str, convert: Callable[[str, str], dict],
                         what: str, cache_env: str) -> str:
    """The checked transformers folder converted from ``source``, made on first
    use by ``convert(source, staging_dir)`` (which returns what the record
    should say of the conversion); ``cache_env`` is the variable that moves
    ``root``, named in the error when it is not writable. Processes converting the same file at once
    each write a staging copy and keep the first complete one.

    Raises:
        ConversionError: the source is missing, the cache root is not
            writable, or a converted folder fails :func:`check_converted`.
    """
    if not osp.isfile(source):
        raise ConversionError(f'{what} {source!r} does not exist')
    directory = converted_dir(source, root)
    if osp.isdir(directory):
        check_converted(directory)
        return directory
    try:
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix='.staging-', dir=root)
    except OSError as err:
        raise ConversionError(f'cannot write the converted {what} under {root} ({err.strerror}): '
                              f'set {cache_env} to a writable folder') from None
    print_log(f'{source}: converting the {what} once, to a transformers checkpoint in '
              f'{directory} (later runs load that)', logger='current')
    try:
        details = convert(source, staging)
        record = dict(source=osp.abspath(source), sha256=file_sha256(source), **details,
                      files=_folder_checksums(staging))
        with open(osp.join(staging, RECORD), 'w', encoding='utf-8') as f:
            json.dump(record, f, indent=2)
        try:
            os.replace(staging, directory)
        except OSError:
            if not osp.isdir(directory):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check_converted(directory)
    return directory
