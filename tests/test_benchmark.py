"""tools/benchmark.py: its restatement of the reference's CMO is the reference's
loss (our faithful mode reproduces it), and a tiny run writes every record."""
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch

import dpa  # noqa: F401
from test_model_equivalence import build_model, make_batch, supervised_labels
from tiny import REPO

from dpa.benchmark import training as benchmark

TINY = ['--vocab-sizes', '600', '--hidden-size', '32', '--intermediate-size', '64',
        '--layers', '1', '--heads', '2', '--kv-heads', '1', '--steps', '1',
        '--caption-batch-size', '4', '--sampler-rows', '50']


def test_restated_reference_equals_the_faithful_mode():
    loss = dict(type='VisualRelevanceLoss', mode='cmo', scope='reference')
    model = build_model('qwen2', loss=loss, text_pass='masked', loss_chunk_size=None)
    with torch.no_grad():  # sharper distributions, a stronger image: the weights vary
        model.llm.lm_head.weight.mul_(40)
        model.projector.linear_2.weight.mul_(20)
    input_ids, attention_mask, pixel_values = make_batch()
    labels = supervised_labels(model, input_ids, attention_mask, pixel_values)
    with torch.no_grad():
        ours = model(input_ids, attention_mask, labels, pixel_values)
        restated = benchmark.reference_cmo_loss(model, input_ids, attention_mask, labels,
                                                pixel_values)
    assert 0 < ours['cmo_at_min'].item() < 1
    assert restated['loss'].item() == pytest.approx(ours['loss'].item(), rel=1e-5)


def test_tiny_run_writes_a_record_per_shape_stage_and_variant(tmp_path):
    path = tmp_path / 'bench.json'
    # In its own process: the benchmark sets torch's threads and glibc's allocator.
    result = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'benchmark.py'), *TINY,
         '--variants', 'cmo', 'vanilla_full_logits', '--json', str(path)],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(path.read_text())
    steps = [r for r in records if r['variant'] in benchmark.VARIANTS]
    keys = {(r['shape'], r['stage'], r['variant']) for r in steps}
    assert keys == {(shape, stage, variant) for shape in benchmark.SHAPES
                    for stage in ('align', 'finetune')
                    for variant in ('vanilla', 'cmo', 'vanilla_full_logits')}
    for record in steps:
        assert record['median_step_s'] > 0 and record['peak_mem_mb'] > 0
        assert record['ratio_to_vanilla'] > 0 and record['tokens_per_s'] > 0
        if record['variant'] == 'vanilla':
            assert record['ratio_to_vanilla'] == 1.0
    packing = {r['variant']: r for r in records if r['stage'] == 'proxy'}
    assert packing['packed']['rows'] < packing['padded']['rows'] == 4
    assert packing['packed']['padding_fraction'] < packing['padded']['padding_fraction']
    sampler, = [r for r in records if r['variant'] == 'group_by_modality_length']
    assert sampler['padding_grouped'] < sampler['padding_random']
    assert '| 600 | blip_lcs | align | cmo |' in result.stdout
    assert 'command: python tools/benchmark.py --vocab-sizes 600' in result.stdout
