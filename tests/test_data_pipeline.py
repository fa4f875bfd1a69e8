"""Data loading: the loader settings a stage gets, and the data-pipeline
benchmark (tools/benchmark.py --data-pipeline), on the tiny default."""
import os.path as osp

import pytest
from mmengine.config import Config
from PIL import Image

import dpa  # noqa: F401
from dpa.benchmark import cli
from dpa.benchmark.data_pipeline import (VISION, gpu_step_estimate, run_data_pipeline,
                                         write_real_size_images)
from dpa.datasets.synthetic import make_synthetic_data
from dpa.engine.dataloader import loader_settings
from dpa.errors import ConfigError
from dpa.engine.standin import make_tiny
from tiny import REPO, TINY

FULL = osp.join(REPO, 'configs', 'dpa_qwen2_5_7b.py')


def test_full_configs_load_beside_the_step_and_tiny_ones_in_process():
    full = Config.fromfile(FULL)
    assert loader_settings(full, 'align', cuda=True) == dict(
        num_workers=4, pin_memory=True, persistent_workers=True, prefetch_factor=2)
    # Pinned memory only helps a copy to a GPU.
    assert not loader_settings(full, 'align', cuda=False)['pin_memory']
    full.finetune.num_workers = 8  # one stage's override
    assert loader_settings(full, 'finetune', cuda=True)['num_workers'] == 8
    assert loader_settings(full, 'proxy', cuda=True)['num_workers'] == 4
    # The stand-in switch and the tiny default load in the training process;
    # the DataLoader refuses persistent workers and prefetching without workers.
    for cfg in (make_tiny(full, cpu_only=True), Config.fromfile(TINY)):
        assert loader_settings(cfg, 'align', cuda=True) == dict(
            num_workers=0, pin_memory=cfg.get('dataloader') is not None,
            persistent_workers=False)


def test_loader_settings_refuse_bad_values():
    cfg = Config.fromfile(FULL)
    cfg.dataloader.prefetch = 4
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['prefetch'\]"):
        loader_settings(cfg, 'align')
    cfg = Config.fromfile(FULL)
    cfg.align.num_workers = -1
    with pytest.raises(ConfigError, match='align.num_workers must be an integer >= 0'):
        loader_settings(cfg, 'align')


def test_benchmark_counts_the_same_batches_with_and_without_workers(tmp_path, capsys):
    records = run_data_pipeline(TINY, workers=(0, 1), batches=2, work_dir=str(tmp_path))
    assert [(r['stage'], r['workers']) for r in records] == [
        (stage, w) for stage in ('proxy', 'align', 'finetune') for w in (0, 1)]
    for without, with_worker in zip(records[::2], records[1::2]):
        for key in ('samples', 'images', 'tokens'):
            assert without[key] == with_worker[key], key
        assert without['tokens_per_s'] > 0 and 'gpu_step_s' not in without  # tiny: no estimate
    proxy, align = records[0], records[2]
    assert proxy['images'] == 0 and align['images'] == align['samples'] == 2 * 4
    # Through the command line: the table.
    cli.main(['--data-pipeline', TINY, '--workers', '0', '--batches', '1'])
    out = capsys.readouterr().out
    assert all(f'| dpa_tiny.py | {stage} | 4 | 0 |' in out
               for stage in ('proxy', 'align', 'finetune'))


def test_real_size_images_are_decoded_at_their_size(tmp_path):
    paths = make_synthetic_data(str(tmp_path / 'data'), num_captions=2, num_instructions=2,
                                num_eval=0)
    copy = write_real_size_images(paths, str(tmp_path / 'real'), (64, 48))
    with Image.open(osp.join(copy['image_folder'], 'cap_000000.jpg')) as image:
        assert (image.format, image.size) == ('JPEG', (64, 48))


def test_gpu_step_estimate_counts_the_passes():
    vision = VISION['clip-vit-large-patch14-336']
    common = dict(batch_size=2, tokens_per_sample=600, images_per_sample=1, image_tokens=576,
                  llm_params=1e9, vision=None, checkpointing=False, text_pass=False,
                  peak_tflops=1.0, mfu=1.0)
    # Frozen LLM: forward + backward to the activations, 4 N per token.
    assert gpu_step_estimate('align', **common) == pytest.approx(2 * 4 * 1e9 * 600 / 1e12)
    trained = gpu_step_estimate('finetune', **dict(common, checkpointing=True))
    assert trained == pytest.approx(2 * 8 * 1e9 * 600 / 1e12)
    cmo = gpu_step_estimate('align', **dict(common, vision=vision, text_pass=True))
    extra = 2 * (2 * vision['params'] * 577 + 2 * 1e9 * 24) / 1e12
    assert cmo - gpu_step_estimate('align', **common) == pytest.approx(extra)
