"""Features of a frozen vision tower, computed once per picture and reused.

DPA freezes the vision tower in every stage, so what it makes of a picture is
the same in every epoch, stage, seed and variant that shows it. On a CPU the
tower's forward is a large share of an align step (a 22 M-parameter DINOv2
against a 135 M-parameter LLM that sees 16 of its tokens), so the features
are kept on disk, one file per picture, under a folder named by everything
that decides them:

- the tower: a sha256 of its weights, its class, ``feature_layer``,
  ``feature_select`` and dtype;
- the picture: a sha256 of the preprocessed pixel tensor (its bytes, shape
  and dtype), which covers the image file's content and every preprocessing
  setting (size, crop, mean/std, padding to a square, AnyRes tiling).

A file is written aside and renamed into place, so concurrent writers (ranks,
parallel seeds) and a killed process never leave a half-written file under a
final name; a file that does not read back as the expected tensor is computed
again and replaced. Nothing is cached while the tower trains.
"""
import hashlib
import os
import os.path as osp
import tempfile
from typing import Callable, Optional

import torch
from mmengine.logging import print_log
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CACHE_ENV = 'DPA_FEATURE_CACHE'
# Bump when the layout or the meaning of a cached file changes. 2: a frozen
# tower computes outside the stage's autocast (dpa.models.vision); a version-1
# entry may hold features computed under bf16 autocast.
FORMAT_VERSION = 2


def feature_cache_root() -> str:
    """``$DPA_FEATURE_CACHE``, else ``~/.cache/dpa/features``."""
    return os.environ.get(CACHE_ENV) or osp.join(osp.expanduser('~'), '.cache', 'dpa', 'features')


def module_digest(module: torch.nn.Module, *settings) -> str:
    """A sha256 of a module's weights (names, shapes, dtypes, values) and of
    ``settings``."""
    digest = hashlib.sha256(repr((FORMAT_VERSION, type(module).__name__) + settings).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f'{name}:{tuple(tensor.shape)}:{tensor.dtype}'.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256(f'{tuple(tensor.shape)}:{tensor.dtype}'.encode())
    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Per-picture features of one frozen tower, on disk.

    Args:
        root: the cache folder (:func:`feature_cache_root` when None).
        tower_digest: :func:`module_digest` of the tower and its settings.
    """

    def __init__(self, root: Optional[str], tower_digest: str):
        self.folder = osp.join(root or feature_cache_root(), tower_digest[:24])
        self.hits = self.misses = 0

    def _path(self, key: str) -> str:
        return osp.join(self.folder, key[:2], key + '.safetensors')

    def _read(self, path: str) -> Optional[torch.Tensor]:
        try:
            return load_file(path)['features']
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, KeyError) as err:
            print_log(f'feature cache: {path} is unreadable ({err}); computing it again',
                      logger='current', level=30)
            return None

    def _write(self, path: str, features: torch.Tensor) -> None:
        os.makedirs(osp.dirname(path), exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix='.staging-', dir=osp.dirname(path))
        os.close(handle)
        try:
            save_file({'features': features.detach().cpu().contiguous()}, staging)
            os.replace(staging, path)
        except OSError as err:
            print_log(f'feature cache: cannot write {path} ({err}); going on without it',
                      logger='current', level=30)
        finally:
            if osp.exists(staging):
                os.remove(staging)

    def features(self, pixel_values: torch.Tensor,
                 compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(pixel_values)``, with each picture's row read from the
        cache when it is there, and written to it when it was not."""
        keys = [tensor_digest(picture) for picture in pixel_values]
        rows = [self._read(self._path(key)) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = compute(pixel_values[missing])
            for i, features in zip(missing, computed):
                rows[i] = features
                self._write(self._path(keys[i]), features)
            expected = computed.shape[1:]
        else:
            expected = rows[0].shape
        if any(row.shape != expected for row in rows):
            # A file of another shape under this key cannot come from this
            # tower: recompute the whole batch rather than trust it.
            return compute(pixel_values)
        device = pixel_values.device
        return torch.stack([row.to(device) for row in rows])
