"""Stage 3 batches grouped by modality and length, as LLaVA's
``group_by_modality_length``: a batch holds image rows or text-only rows, never
both, and rows of similar length, so little of it is padding."""
import math
from typing import Callable, Iterator, List, Sequence, Tuple, Union

import torch
from mmengine.dist import get_dist_info, sync_random_seed
from mmengine.logging import print_log
from torch.utils.data import Sampler

from dpa.registry import DATA_SAMPLERS


# ``image_length`` when the number of image tokens depends on the image (AnyRes).
PER_IMAGE = 'per_image'


def image_token_counter(dataset) -> Callable[[int], int]:
    """``index -> image tokens of that row`` of an ``LLaVADataset`` or
    ``LLaVAMixture`` (see ``LLaVADataset.image_tokens``)."""
    if hasattr(dataset, 'image_tokens'):
        return dataset.image_tokens
    if isinstance(getattr(dataset, 'datasets', None), list) and hasattr(dataset, 'index'):
        # LLaVAMixture: (source, row) of each sample.
        return lambda i: dataset.datasets[int(dataset.index[i][0])].image_tokens(
            int(dataset.index[i][1]))
    raise ValueError(f"image_length='{PER_IMAGE}' needs an LLaVADataset or LLaVAMixture, "
                     f'got {type(dataset).__name__}')


def modality_lengths(dataset, image_length: Union[int, str]) -> Tuple[List[int], List[bool]]:
    """Estimated length and modality of every row of a LLaVA-format dataset,
    read from its rows without tokenising them (as LLaVA does): the words of
    its conversation, plus ``image_length`` for a row with an image.

    Args:
        dataset: a dataset whose ``get_data_info(i)['row']`` is a LLaVA row
            (``LLaVADataset``, ``LLaVAMixture``).
        image_length: tokens one image adds to a row; ``'per_image'``: each
            image's own number (AnyRes), read from the image file's header.
    """
    image_tokens = (image_token_counter(dataset) if image_length == PER_IMAGE else
                    lambda index: image_length)
    lengths, has_image = [], []
    for index in range(len(dataset)):
        row = dataset.get_data_info(index)['row']
        if not isinstance(row, dict):  # a malformed row: the dataset skips it when read
            row = {}
        turns = [turn for turn in row.get('conversations') or [] if isinstance(turn, dict)]
        words = sum(len(str(turn.get('value') or '').split()) for turn in turns)
        image = 'image' in row
        lengths.append(max(words, 1) + (image_tokens(index) if image else 0))
        has_image.append(image)
    return lengths, has_image


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of a padded batch's tokens that are padding, over all batches."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1.0 - real / padded if padded else 0.0


@DATA_SAMPLERS.register_module()
class ModalityLengthGroupedSampler(Sampler):
    """Shuffled indices whose consecutive ``batch_size`` runs (one process's
    batches) are of one modality and of similar lengths.

    Each epoch, the image rows and the text-only rows are shuffled separately
    and cut into groups of ``group_batches`` global batches (``batch_size`` x
    processes rows each); a group is sorted by length and cut into global
    batches, and the global batches of both modalities are shuffled together.
    Every process takes its share of each global batch, so the processes of one
    step see rows of the same modality and similar lengths. The incomplete
    global batch of each modality ends the epoch (the only batches that may mix
    modalities). Every index is drawn once per epoch; when the dataset size is
    not a multiple of the number of processes, the last global batch repeats up
    to processes - 1 rows so that every process has as many samples (as
    mmengine's ``DefaultSampler(round_up=True)``).

    Args:
        dataset: LLaVA-format dataset, see :func:`modality_lengths`.
        batch_size: samples per process and step (the dataloader's batch size).
        image_length: tokens an image adds to a row (the vision tower's number
            of image tokens), for the length estimate; ``'per_image'``: each
            image's own number (AnyRes).
        group_batches: global batches sorted by length together: more groups
            batches more tightly by length, fewer keeps more randomness. LLaVA
            sorts within one global batch; Hugging Face's length-grouped sampler
            uses 50.
        seed: shuffle seed, the same on every process; None: a random one,
            shared by all processes.
    """

    def __init__(self,
                 dataset,
                 batch_size: int,
                 image_length: Union[int, str] = 0,
                 group_batches: int = 50,
                 seed=None):
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f'batch_size ({batch_size}) and group_batches ({group_batches}) '
                             'must be positive')
        self.rank, self.world_size = get_dist_info()
        self.dataset = dataset
        self.batch_size, self.group_batches = batch_size, group_batches
        self.seed = sync_random_seed() if seed is None else seed
        self.epoch = 0
        self.lengths, has_image = modality_lengths(dataset, image_length)
        self.modalities = [[i for i, image in enumerate(has_image) if image],
                           [i for i, image in enumerate(has_image) if not image]]
        self.num_samples = math.ceil(len(self.lengths) / self.world_size)
        report = self.padding_report()
        print_log(f'[{type(self).__name__}] {len(self.modalities[0])} image rows, '
                  f'{len(self.modalities[1])} text-only rows; padding (lengths estimated from '
                  f'word counts): {report["random"]:.1%} in random batches, '
                  f'{report["grouped"]:.1%} grouped by modality and length', logger='current')

    def global_batches(self, epoch: int) -> List[List[int]]:
        """The epoch's global batches, in training order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        global_size = self.batch_size * self.world_size
        batches, incomplete = [], []
        for indices in self.modalities:
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator)]
            group_size = global_size * self.group_batches
            for start in range(0, len(order), group_size):
                group = sorted(order[start:start + group_size], key=lambda i: -self.lengths[i])
                for first in range(0, len(group), global_size):
                    batch = group[first:first + global_size]
                    (batches if len(batch) == global_size else incomplete).append(batch)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        rest = sorted((i for batch in incomplete for i in batch), key=lambda i: -self.lengths[i])
        return batches + [rest[i:i + global_size] for i in range(0, len(rest), global_size)]

    def rank_batches(self, epoch: int, rank: int) -> List[List[int]]:
        """The batches process ``rank`` trains on in ``epoch``."""
        return [self._rank_share(batch, rank) for batch in self.global_batches(epoch)]

    def _rank_share(self, batch: List[int], rank: int) -> List[int]:
        share = math.ceil(len(batch) / self.world_size)
        batch = (batch * self.world_size)[:share * self.world_size]  # round up, see above
        return batch[rank * share:(rank + 1) * share]

    def padding_report(self) -> dict:
        """Padding fraction of this epoch's batches (all processes), and of
        random batches of the same size (what ``DefaultSampler`` gives)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shuffled = torch.randperm(len(self.lengths), generator=generator).tolist()
        random = [shuffled[i:i + self.batch_size]
                  for i in range(0, len(shuffled), self.batch_size)]
        # The epoch's batches are drawn once, not once per process.
        grouped = [self._rank_share(batch, rank) for batch in self.global_batches(self.epoch)
                   for rank in range(self.world_size)]
        return dict(random=padding_fraction(self.lengths, random),
                    grouped=padding_fraction(self.lengths, grouped))

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.rank_batches(self.epoch, self.rank) for i in batch])

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
