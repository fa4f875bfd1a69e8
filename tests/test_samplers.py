"""The stage-3 sampler: batches of one modality and similar lengths, every index
once per epoch on one and two processes, deterministic for a seed."""
import pytest
import torch
from mmengine.runner import Runner

import dpa  # noqa: F401
import dpa.datasets.samplers as samplers
from dpa.datasets.samplers import ModalityLengthGroupedSampler, modality_lengths, padding_fraction
from dpa.engine.pipeline import prepare_synthetic_data
from dpa.engine.stage_config import stage_runner_config
from tiny import tiny_config

IMAGE_LENGTH = 100


class Rows:
    """A LLaVA-like dataset: rows with or without an image, of given word counts."""

    def __init__(self, n, seed=0, text_only=0.3):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            words = int(torch.randint(1, 300, (1, ), generator=g))
            row = {'conversations': [{'from': 'human', 'value': 'q ' * 3},
                                     {'from': 'gpt', 'value': 'a ' * words}]}
            if torch.rand(1, generator=g) >= text_only:
                row['image'] = 'x.png'
            self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def get_data_info(self, index):
        return dict(row=self.rows[index])


def sampler_on(monkeypatch, dataset, rank=0, world_size=1, **kwargs):
    monkeypatch.setattr(samplers, 'get_dist_info', lambda: (rank, world_size))
    kwargs.setdefault('seed', 0)
    return ModalityLengthGroupedSampler(dataset, image_length=IMAGE_LENGTH, **kwargs)


def test_lengths_estimated_from_words_and_image():
    dataset = Rows(3)
    lengths, has_image = modality_lengths(dataset, IMAGE_LENGTH)
    for row, length, image in zip(dataset.rows, lengths, has_image):
        words = sum(len(t['value'].split()) for t in row['conversations'])
        assert image == ('image' in row)
        assert length == words + (IMAGE_LENGTH if image else 0)
    assert padding_fraction([2, 4, 4], [[0, 1], [2]]) == pytest.approx(1 - 10 / 12)


def batches_of(sampler, batch_size):
    indices = list(sampler)
    assert len(indices) == len(sampler)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


@pytest.mark.parametrize('n,batch_size', [(200, 4), (203, 5), (7, 4)])
def test_one_process_covers_every_index_once_in_pure_batches(monkeypatch, n, batch_size):
    dataset = Rows(n)
    sampler = sampler_on(monkeypatch, dataset, batch_size=batch_size, group_batches=4)
    lengths, has_image = modality_lengths(dataset, IMAGE_LENGTH)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = batches_of(sampler, batch_size)
        assert sorted(i for b in batches for i in b) == list(range(n))
        mixed = [b for b in batches if len({has_image[i] for i in b}) > 1]
        # Only the incomplete batches of the two modalities, merged, may mix them.
        assert len(mixed) <= 2 and all(b in batches[-2:] for b in mixed)


def test_two_processes_split_every_step_and_cover_every_index_once(monkeypatch):
    dataset, batch_size = Rows(202), 4
    ranks = [sampler_on(monkeypatch, dataset, rank, 2, batch_size=batch_size) for rank in (0, 1)]
    _, has_image = modality_lengths(dataset, IMAGE_LENGTH)
    for epoch in range(2):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        per_rank = [batches_of(sampler, batch_size) for sampler in ranks]
        assert len(per_rank[0]) == len(per_rank[1])
        assert len(ranks[0]) == len(ranks[1]) == 101
        drawn = [i for batches in per_rank for b in batches for i in b]
        assert sorted(drawn) == list(range(202))  # 202 = 2 x 101: exactly once
        # The two processes of a step train on the same modality.
        steps = list(zip(*per_rank))
        same = [has_image[a[0]] == has_image[b[0]] for a, b in steps[:-2]]
        assert all(same)


def test_uneven_dataset_repeats_fewer_rows_than_processes(monkeypatch):
    dataset, batch_size = Rows(203), 4
    ranks = [sampler_on(monkeypatch, dataset, rank, 2, batch_size=batch_size) for rank in (0, 1)]
    drawn = [i for sampler in ranks for i in sampler]
    assert len(ranks[0]) == len(ranks[1]) == 102
    assert sorted(set(drawn)) == list(range(203)) and len(drawn) == 204


def test_batches_group_lengths(monkeypatch):
    dataset = Rows(400)
    sampler = sampler_on(monkeypatch, dataset, batch_size=8)
    report = sampler.padding_report()
    assert report['random'] > 0.3
    assert report['grouped'] < report['random'] / 5
    batches = batches_of(sampler, 8)
    assert padding_fraction(sampler.lengths, batches) == pytest.approx(report['grouped'])


def test_order_depends_on_seed_and_epoch_only(monkeypatch):
    dataset = Rows(100)
    first = list(sampler_on(monkeypatch, dataset, batch_size=4))
    assert list(sampler_on(monkeypatch, dataset, batch_size=4)) == first
    assert list(sampler_on(monkeypatch, dataset, batch_size=4, seed=1)) != first
    sampler = sampler_on(monkeypatch, dataset, batch_size=4)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first)


def test_finetune_stage_samples_by_modality_and_length(finished, data_root):
    work_dir, _ = finished
    cfg = tiny_config(work_dir, data_root)
    prepare_synthetic_data(cfg)
    loader_cfg = stage_runner_config(cfg, 'finetune').train_dataloader
    assert loader_cfg.sampler.type == 'ModalityLengthGroupedSampler'
    assert loader_cfg.sampler.batch_size == cfg.finetune.batch_size
    loader = Runner.build_dataloader(loader_cfg, seed=0)
    sampler = loader.sampler
    indices = list(sampler)
    assert sorted(indices) == list(range(len(loader.dataset)))
    has_image = ['image' in loader.dataset.get_data_info(i)['row'] for i in indices]
    assert 0 < sum(has_image) < len(has_image)  # the tiny data mixes text-only rows in
    batches = [has_image[i:i + 4] for i in range(0, len(indices), 4)]
    assert sum(len(set(b)) > 1 for b in batches) <= 2
