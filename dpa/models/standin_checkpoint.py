"""Random stand-ins pass through disk like the checkpoints they replace.

A model built from a config in memory skips everything ``from_pretrained``
does: reading config.json back, re-creating non-persistent buffers, tying
weights, choosing tokenizer classes from tokenizer_config.json. Real
checkpoints fail there (see docs/families.md, InternLM2), so stand-ins are
saved and loaded back before use, from a directory that stays (PEFT and
others read ``name_or_path`` again later, as they would a user's checkpoint).
"""
import hashlib
import os
import os.path as osp
import shutil
import tempfile
from typing import Callable, TypeVar

from transformers.utils import logging as hf_logging

Loaded = TypeVar('Loaded')
CACHE_ENV = 'DPA_STANDIN_CACHE'


def standin_cache_root() -> str:
    """Where saved stand-ins live: ``$DPA_STANDIN_CACHE``, else a folder in
    the system's temporary directory."""
    return os.environ.get(CACHE_ENV) or osp.join(tempfile.gettempdir(), 'dpa-standins')


def _content_hash(directory: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        digest.update(name.encode() + b'\0')
        with open(osp.join(directory, name), 'rb') as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:24]


def _save_from_this_process(part, directory: str) -> None:
    """``save_pretrained`` in every process: a stand-in is whole in each one
    (built from the same seed), but transformers 5 writes a model only from
    rank 0 once a process group exists, leaving the other ranks an empty
    directory."""
    if not hasattr(part, 'should_save_on_this_rank'):
        part.save_pretrained(directory)
        return
    part.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        part.save_pretrained(directory)
    finally:
        del part.should_save_on_this_rank


def reload_as_checkpoint(part, load: Callable[[str], Loaded]) -> Loaded:
    """``part`` saved with ``save_pretrained`` and loaded back with
    ``load(directory)``.

    The directory is named by a hash of the saved files under
    :func:`standin_cache_root` and is moved into place whole, so processes
    building the same stand-in at once (ranks) share one complete copy and
    never read a half-written one.

    Args:
        part: a transformers model, tokenizer or image processor.
        load: reads a saved directory back, e.g. ``AutoModelForCausalLM.from_pretrained``.
    """
    root = standin_cache_root()
    os.makedirs(root, exist_ok=True)
    # Progress bars for a tiny model's one shard are noise in every run's log.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        staging = tempfile.mkdtemp(prefix='.staging-', dir=root)
        try:
            _save_from_this_process(part, staging)
            if not os.listdir(staging):
                raise RuntimeError(f'{type(part).__name__}.save_pretrained wrote nothing')
            directory = osp.join(root, f'dpa-standin-{_content_hash(staging)}')
            if not osp.isdir(directory):
                try:
                    os.replace(staging, directory)
                except OSError:
                    if not osp.isdir(directory):  # not another process's copy: a real error
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return load(directory)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
