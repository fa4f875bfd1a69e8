"""Mixtures of LLaVA-format datasets, each source sampled at its own ratio.

A data config is either one LLaVA source (``data_files``, ``image_folder``) or
a mixture::

    caption_data = dict(
        type='LLaVAMixture',
        sources=dict(
            blip_lcs_558k=dict(data_files=[...], image_folder=..., ratio=1.0),
            sharegpt4v_pt=dict(data_files=[...], image_folder=..., ratio=0.5)),
        seed=0)

**Epoch length.** A source of ``n`` rows with ratio ``r`` contributes
``round(r * n)`` samples to every epoch; the epoch (``len(mixture)``, what the
training loop calls one epoch) is the sum over the sources. ``r <= 1`` draws a
random subset of the source's rows without replacement (``r=0.25``: a quarter
of the data); ``r > 1`` takes every row ``floor(r)`` times plus a random
subset for the fractional part.

**Determinism.** Which rows are drawn depends only on ``seed``, the source's
name and its row count, never on the process or the run, so every rank of a
distributed run and every resumed run see the same epoch; the order within the
epoch is the sampler's shuffle.
"""
import hashlib
import os.path as osp
from typing import Dict, List, Sequence

import numpy as np
from mmengine.logging import print_log
from torch.utils.data import Dataset

from dpa.datasets.llava import read_rows
from dpa.errors import ConfigError
from dpa.registry import DATASETS

SOURCE_KEYS = ('data_files', 'image_folder', 'ratio')


def data_sources(data: dict) -> Dict[str, dict]:
    """The sources of a data config by name: a mixture's ``sources``, or the
    config itself (named ``'data'``) when it is a single source."""
    if data.get('type') == 'LLaVAMixture':
        return dict(data['sources'])
    return {'data': data}


def sample_rows(num_rows: int, ratio: float, seed: int, name: str) -> np.ndarray:
    """Row indices one source contributes to an epoch, in row order.

    Args:
        num_rows: rows in the source.
        ratio: samples per epoch as a multiple of ``num_rows``.
        seed: mixture seed.
        name: the source's name; it keys the random draw, so adding a source
            does not change which rows the others contribute.
    """
    if ratio < 0:
        raise ValueError(f'source {name!r}: ratio must be >= 0, got {ratio}')
    count = int(round(ratio * num_rows))
    whole, rest = divmod(count, num_rows) if num_rows else (0, 0)
    # A stable per-source seed: Python's hash() of a str changes per process.
    digest = hashlib.sha256(f'{seed}:{name}'.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], 'little'))
    subset = np.sort(rng.choice(num_rows, size=rest, replace=False)) if rest else []
    return np.concatenate([np.tile(np.arange(num_rows), whole), subset]).astype(np.int64)


@DATASETS.register_module()
class LLaVAMixture(Dataset):
    """Several LLaVA-format sources as one dataset, each at its sampling ratio
    (see the module docstring for the epoch length and determinism).

    Args:
        sources: name -> ``dict(data_files=..., image_folder=..., ratio=1.0)``.
        seed: seed of the rows drawn from each source.
        **dataset_args: ``LLaVADataset`` arguments shared by every source
            (tokenizer, template, image processor, max length, ...).
    """

    def __init__(self, sources: Dict[str, dict], seed: int = 0, **dataset_args):
        if not sources:
            raise ValueError('LLaVAMixture needs at least one source')
        self.names: List[str] = list(sources)
        self.datasets = []
        index = []
        lines = []
        for source_id, (name, spec) in enumerate(sources.items()):
            unknown = set(spec) - set(SOURCE_KEYS)
            if unknown:
                raise ValueError(f'source {name!r}: unknown keys {sorted(unknown)}; a source has '
                                 f'{list(SOURCE_KEYS)}')
            dataset = DATASETS.build(dict(type='LLaVADataset', data_files=spec['data_files'],
                                          image_folder=spec.get('image_folder', ''),
                                          **dataset_args))
            ratio = spec.get('ratio', 1.0)
            rows = sample_rows(len(dataset), ratio, seed, name)
            self.datasets.append(dataset)
            index.append(np.stack([np.full_like(rows, source_id), rows], axis=1))
            lines.append(f'{name}: {len(dataset)} rows x ratio {ratio:g} = {len(rows)} samples')
        self.index = np.concatenate(index)
        self.counts = {name: int((self.index[:, 0] == i).sum())
                       for i, name in enumerate(self.names)}
        print_log(f'[LLaVAMixture] epoch of {len(self.index)} samples: ' + '; '.join(lines),
                  logger='current')

    @property
    def metainfo(self) -> dict:
        """Samples per source in an epoch; the Runner stores it in checkpoints
        and warns when a resumed run's mixture differs."""
        return dict(samples_per_source=dict(self.counts))

    @property
    def tokenizer(self):
        """The tokenizer every source shares (``tools/check_data.py`` reads it)."""
        return self.datasets[0].tokenizer

    @property
    def load_problems(self) -> List[dict]:
        """Unreadable rows of every source (see ``LLaVADataset.load_problems``)."""
        return [problem for dataset in self.datasets for problem in dataset.load_problems]

    def __len__(self) -> int:
        return len(self.index)

    def _locate(self, idx: int):
        source_id, row = self.index[idx]
        return self.datasets[source_id], int(row)

    def __getitem__(self, idx: int) -> dict:
        dataset, row = self._locate(idx)
        return dataset[row]

    def get_data_info(self, idx: int) -> dict:
        dataset, row = self._locate(idx)
        return dataset.get_data_info(row)

    def prepare_data(self, idx: int) -> dict:
        dataset, row = self._locate(idx)
        return dataset.prepare_data(row)


def source_name(data_key: str, name: str) -> str:
    """How messages name a dataset or one source of a mixture."""
    return data_key if name == 'data' else f'{data_key}.sources.{name}'


def as_list(files) -> list:
    return [files] if isinstance(files, str) else list(files)


def check_data_sources(cfg, data_keys: Sequence[str]) -> None:
    """The datasets ``data_keys`` of the config exist and name files and image
    folders that exist (files may be left out with ``synthetic_data``)."""
    for data_key in data_keys:
        data = cfg.get(data_key)
        if data is None:
            raise ConfigError(f'a stage reads `{data_key}` but the config does not define it')
        for name, source in data_sources(data).items():
            where = source_name(data_key, name)
            files = as_list(source.data_files)
            if not files and not cfg.get('synthetic_data'):
                raise ConfigError(f'{where}.data_files is empty: name the json/jsonl files')
            for path in files:
                if not osp.isfile(path):
                    raise ConfigError(f'{where}.data_files: {path!r} does not exist')
            folder = source.get('image_folder')
            if folder and not osp.isdir(folder):
                raise ConfigError(f'{where}.image_folder: {folder!r} is not a directory')


def check_data_files(cfg, data_keys: Sequence[str]) -> None:
    """Every data file of the datasets ``data_keys`` parses and holds rows,
    checked before any model loads (a stage would otherwise fail only when it
    starts, after the stages before it have trained). Bad rows are left to
    training."""
    for data_key in data_keys:
        for name, source in data_sources(cfg[data_key]).items():
            where = source_name(data_key, name)
            for path in as_list(source.data_files):
                problems = []
                try:
                    rows = read_rows(path, problems)
                except (OSError, ValueError) as err:
                    raise ConfigError(f'{where}.data_files: {err}') from None
                if not rows:
                    invalid = f' ({len(problems)} invalid json lines)' if problems else ''
                    raise ConfigError(f'{where}.data_files: {path} holds no rows{invalid}; a '
                                      'LLaVA json file holds a list of rows, a jsonl file one '
                                      'row a line (tools/check_data.py checks them)')
