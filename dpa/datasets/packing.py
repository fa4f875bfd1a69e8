"""Sequence packing for text-only batches (stage 1 trains on short captions).

``packed_collate`` puts the samples of one batch into as few rows as fit,
instead of padding every sample to the longest one. Each row is the
concatenation of whole samples; ``position_ids`` restart at 0 for every sample
and the batch has no ``attention_mask``: Hugging Face models then read the
restarts as sequence boundaries and keep attention inside each sample (a
block-diagonal causal mask for sdpa/eager; flash attention's variable-length
kernel only for a batch of one row, see ``one_row``). The first label of every
sample is ignored, so no sample is predicted from the one before it: a packed
batch has exactly the loss of the padded batch of the same samples, and a
packed run the losses of a padded run.
"""
from typing import List, Optional, Sequence

import torch

from dpa.models.losses import IGNORE_INDEX
from dpa.registry import FUNCTIONS


def pack_rows(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Group samples into rows of at most ``capacity`` tokens, first-fit
    decreasing (longest sample first, into the first row it fits).

    Args:
        lengths: tokens of each sample.
        capacity: tokens per row; at least the longest sample.

    Returns:
        Sample indices of each row, in sample order.
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f'a sample of {max(lengths)} tokens does not fit a row of {capacity}')
    rows, free = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, space in enumerate(free):
            if lengths[index] <= space:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(capacity - lengths[index])
    return [sorted(row) for row in rows]


@FUNCTIONS.register_module()
def packed_collate(samples: List[dict], pack_length: Optional[int] = None,
                   one_row: bool = False) -> dict:
    """Pack text-only samples into rows (see the module docstring).

    Args:
        samples: dataset samples (``input_ids``, ``labels``, no image).
        pack_length: tokens per row. None: the longest sample of the batch, so
            no row is longer than in the padded batch and attention, which
            sdpa/eager compute over the whole row, costs no more than padding.
        one_row: all samples in a single row, no padding at all: the layout
            flash attention's variable-length kernel needs (transformers only
            detects packed sequences for it in a batch of one row; see
            :mod:`dpa.models.attention`). Its cost grows with each sample's
            length, not the row's; under sdpa/eager it would grow with the row's.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (rows x longest row),
        ``attention_mask=None`` and ``pixel_values=None``.
    """
    if any(s.get('pixel_values') is not None for s in samples):
        raise ValueError('packed_collate packs text-only samples; this batch holds images')
    lengths = [len(s['input_ids']) for s in samples]
    capacity = sum(lengths) if one_row else max([pack_length or 0] + lengths)
    rows = pack_rows(lengths, capacity)
    length = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            n = lengths[index]
            input_ids[r, start:start + n] = samples[index]['input_ids']
            labels[r, start + 1:start + n] = samples[index]['labels'][1:]
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        # The padding restarts its positions too: a segment of its own.
        position_ids[r, start:] = torch.arange(length - start)
    batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids,
                 attention_mask=None, pixel_values=None)
    skipped = [record for s in samples for record in s.get('skipped', [])]
    if skipped:
        # Taken out by DPAHook before the batch reaches the model, as dpa_collate's.
        batch['skipped'] = skipped
    return batch
