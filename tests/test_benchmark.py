"""tools/benchmark.py: its restatement of the reference's CMO is the reference's
loss (our faithful mode reproduces it), and a tiny run writes every record."""
import json
import os.path as osp
import subprocess
import sys
from functools import partial

import pytest
import torch

import dpa  # noqa: F401
from dpa.models import VisualRelevanceLoss
from test_model_equivalence import build_model, make_batch, supervised_labels
from tiny import REPO

from dpa.benchmark import cli as benchmark_cli
from dpa.benchmark import training as benchmark
from dpa.benchmark.peer import peer_loss, transformers_llava
from dpa.benchmark.profile import profile_variants

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
         '--variants', 'cmo', 'hf_llava', 'vanilla_full_logits', '--json', str(path)],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(path.read_text())
    steps = [r for r in records if r['variant'] in benchmark.VARIANTS]
    keys = {(r['shape'], r['stage'], r['variant']) for r in steps}
    assert keys == {(shape, stage, variant) for shape in benchmark.SHAPES
                    for stage in ('align', 'finetune')
                    for variant in ('vanilla', 'cmo', 'hf_llava', 'vanilla_full_logits')}
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


@pytest.mark.parametrize('trainable', [('projector', ), ('llm', 'projector')])
def test_peer_is_the_same_model_under_transformers_llava(trainable):
    """hf_llava shares the modules: its loss is our vanilla loss and its
    gradients are ours, so the benchmark compares the two implementations only."""
    model = build_model('qwen2', loss=dict(type='VisualRelevanceLoss', mode='vanilla'),
                        trainable=trainable)
    input_ids, attention_mask, pixel_values = make_batch()
    labels = supervised_labels(model, input_ids, attention_mask, pixel_values)
    llava = transformers_llava(model)
    assert {id(p) for p in llava.parameters()} == {id(p) for p in model.parameters()
                                                   if not p.is_meta}
    grads = {}
    batch = (input_ids, attention_mask, labels, pixel_values)
    for name, loss_fn in (('ours', model), ('peer', partial(peer_loss, llava))):
        model.zero_grad()
        loss = loss_fn(*batch)['loss']
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None})
    (ours, ours_grads), (peer, peer_grads) = grads['ours'], grads['peer']
    torch.testing.assert_close(peer.double(), ours, rtol=1e-5, atol=1e-6)  # HF: float32 loss
    assert ours_grads.keys() == peer_grads.keys() and ours_grads
    for name in ours_grads:
        torch.testing.assert_close(peer_grads[name], ours_grads[name], rtol=1e-4, atol=1e-6)


def test_profile_splits_the_step_into_its_parts():
    records = profile_variants(benchmark_cli.parse_args(
        [*TINY, '--shapes', 'blip_lcs', '--stages', 'align', '--variants', 'cmo',
         'cmo_all_text_scores', '--vocab-sizes', '600', '--warmup', '1']))
    parts = {r['variant']: r['parts_ms'] for r in records}
    assert parts.keys() == {'vanilla', 'cmo', 'cmo_all_text_scores'}
    for variant, ms in parts.items():
        named = sum(v for k, v in ms.items() if k not in ('step', 'other'))
        assert ms['step'] > 0 and ms['image pass fwd'] > 0 and ms['backward'] > 0
        assert named == pytest.approx(ms['step'] - ms['other'])
        assert 0 <= ms['other'] < 0.2 * ms['step']
    # The random model puts every target at delta_min: CMO runs no no-image
    # pass; scoring every target runs it whole.
    assert parts['vanilla']['text pass fwd'] == 0 == parts['cmo']['text pass fwd']
    assert parts['cmo_all_text_scores']['text pass fwd'] > 0
    assert parts['cmo_all_text_scores']['scores (text)'] > 0


def test_anyres_peer_is_the_same_model_under_transformers_llava_next():
    args = benchmark_cli.parse_args([*TINY, '--vocab-sizes', '600'])
    shape = benchmark.SHAPES['anyres']
    model = benchmark.build_model(args, 600, ('projector', ), grid=shape.grid)
    batch = benchmark.make_batch(shape, 2, 600, True, args)
    assert batch['pixel_values'].shape[0] == 2 * 5 and batch['image_sizes'].shape == (2, 2)
    assert int((batch['input_ids'] == benchmark.IMAGE_TOKEN_ID).sum()) == 2 * 2928
    model.loss_fn = VisualRelevanceLoss(mode='vanilla')
    ours = model(**batch)['loss']
    peer = peer_loss(transformers_llava(model), **batch)['loss']
    torch.testing.assert_close(peer, ours, rtol=1e-5, atol=1e-6)


def write_shape_only_config(tmp_path, llm_dir=None):
    """A config on the tiny default whose LLM and vision tower point at
    checkpoint folders that hold a config.json and nothing else: the
    benchmark's --config mode needs their shape, not their weights."""
    from transformers import CLIPVisionConfig, LlamaConfig
    if llm_dir is None:
        llm_dir = tmp_path / 'llm'
        LlamaConfig(vocab_size=600, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    tie_word_embeddings=True).save_pretrained(llm_dir)
    vision_dir = tmp_path / 'vision'
    CLIPVisionConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=2, image_size=32, patch_size=4).save_pretrained(vision_dir)
    path = tmp_path / 'shape_only.py'
    path.write_text(
        f"_base_ = [{osp.join(REPO, 'configs', 'dpa_tiny.py')!r}]\n"
        f"llm = dict(_delete_=True, type='HFCausalLM', pretrained={str(llm_dir)!r}, "
        "torch_dtype='float32')\n"
        f"vision_tower = dict(_delete_=True, type='HFVisionTower', pretrained={str(vision_dir)!r}, "
        "feature_layer=-2, torch_dtype='float32')\n"
        "align = dict(batch_size=3, global_batch_size=6)\n")
    return path


def test_config_mode_times_the_configs_model_at_its_shape_in_one_run(tmp_path):
    from dpa.benchmark.config_run import config_markdown, run_config_variants
    path = write_shape_only_config(tmp_path)
    args = benchmark_cli.parse_args(['--config', str(path), '--steps', '2',
                                     '--variants', 'cmo', 'cmo_reference', 'hf_llava'])
    records = run_config_variants(args, work_dir=str(tmp_path / 'work'))
    assert {(r['stage'], r['variant']) for r in records} == {
        (stage, variant) for stage in ('align', 'finetune')
        for variant in ('vanilla', 'cmo', 'cmo_reference', 'hf_llava')}
    for r in records:
        # The model timed: the checkpoint's shapes, random weights.
        assert (r['llm_type'], r['hidden_size'], r['layers'], r['intermediate_size'],
                r['heads'], r['kv_heads'], r['vocab_size']) == ('llama', 48, 3, 96, 4, 2, 600)
        assert (r['vision_type'], r['vision_hidden'], r['vision_layers']) == \
            ('clip_vision_model', 40, 3)
        assert r['image_tokens'] == (32 // 4) ** 2
        assert r['shape'] == ('caption_data' if r['stage'] == 'align' else 'instruct_data')
        assert r['median_step_s'] > 0 and r['peak_mem_mb'] > 0 and r['tokens_per_s'] > 0
    for stage in ('align', 'finetune'):
        rows = {r['variant']: r for r in records if r['stage'] == stage}
        base = rows['vanilla']
        for r in rows.values():  # the ratios of one run, to its own vanilla
            assert r['ratio_to_vanilla'] == \
                pytest.approx(r['median_step_s'] / base['median_step_s'])
            assert r['mem_ratio_to_vanilla'] == \
                pytest.approx(r['peak_mem_mb'] / base['peak_mem_mb'])
    align = next(r for r in records if r['stage'] == 'align')
    assert align['trainable'] == ['projector'] and align['batch_size'] == 3  # the recipe's
    assert [b['share'] for b in align['batches']] == [1.0]
    finetune = next(r for r in records if r['stage'] == 'finetune')
    assert finetune['trainable'] == ['llm', 'projector']
    # Stage 3 groups rows by modality: an image batch and a text-only batch.
    assert [b['images'] > 0 for b in finetune['batches']] == [True, False]
    assert sum(b['share'] for b in finetune['batches']) == pytest.approx(1.0)
    table = config_markdown(records, args)
    assert 'llama hidden 48, 3 layers' in table
    assert '| 600 | caption_data | align | cmo_reference |' in table


def test_config_mode_refuses_what_it_cannot_benchmark(tmp_path, capsys):
    path = write_shape_only_config(tmp_path, llm_dir=tmp_path / 'missing')
    with pytest.raises(SystemExit) as raised:
        benchmark_cli.main(['--config', str(path), '--steps', '1'])
    message = str(raised.value.code)
    assert 'cannot benchmark it' in message and 'missing' in message
    text_only = tmp_path / 'text_only.py'
    text_only.write_text(f"_base_ = [{osp.join(REPO, 'configs', 'dpa_tiny.py')!r}]\n"
                         "stages = ['proxy']\n")
    with pytest.raises(SystemExit) as raised:
        benchmark_cli.main(['--config', str(text_only), '--steps', '1'])
    assert 'trains none of the stages' in str(raised.value.code)
    for argv in (['--real-weights'], ['--config', str(path), '--profile']):
        with pytest.raises(SystemExit):
            benchmark_cli.parse_args(argv)


def test_peer_takes_an_image_id_outside_the_vocabulary():
    """SmolLM2's tokenizer adds <image> after the LLM's vocabulary: ours masks
    it before the embedding lookup, the peer is given a free id inside it."""
    model = build_model('qwen2', loss=dict(type='VisualRelevanceLoss', mode='vanilla'))
    input_ids, attention_mask, pixel_values = make_batch()
    labels = supervised_labels(model, input_ids, attention_mask, pixel_values)
    vocab = model.llm.get_input_embeddings().num_embeddings
    outside = input_ids.masked_fill(input_ids == model.image_token_id, vocab + 7)
    llava = transformers_llava(model)
    with torch.no_grad():
        want = model(input_ids, attention_mask, labels, pixel_values)['loss']
        model.image_token_id = vocab + 7
        ours = model(outside, attention_mask, labels, pixel_values)['loss']
        llava.dpa_image_token_id = vocab + 7
        peer = peer_loss(llava, outside, attention_mask, labels, pixel_values)['loss']
    assert ours == want
    torch.testing.assert_close(peer.double(), want, rtol=1e-5, atol=1e-6)
    assert int(outside.max()) == vocab + 7 and llava.config.image_token_id < vocab
