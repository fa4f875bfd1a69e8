"""Stage-1 sequence packing: rows of whole samples, attention inside each
sample, and losses and gradients equal to the padded batch's and the padded
run's."""
import pytest
import torch
from safetensors.torch import load_file

import dpa  # noqa: F401
from dpa.datasets.llava import dpa_collate
from dpa.datasets.packing import pack_rows, packed_collate
from dpa.engine.pipeline import run_pipeline
from dpa.engine.stage_config import stage_runner_config
from dpa.errors import ConfigError
from dpa.models import LlavaDPAModel
from dpa.models.losses import IGNORE_INDEX
from test_model_equivalence import llm_cfg
from tiny import tiny_config

LENGTHS = [7, 3, 12, 5, 9, 2]


def test_pack_rows_first_fit_decreasing():
    # Longest first, each into the first row with room: 12 | 9 + 3 | 7 + 5 | 2.
    assert pack_rows(LENGTHS, capacity=12) == [[2], [1, 4], [0, 3], [5]]
    # 12 + 7 | 9 + 5 + 3 + 2
    assert pack_rows(LENGTHS, capacity=20) == [[0, 2], [1, 3, 4, 5]]
    with pytest.raises(ValueError, match='does not fit'):
        pack_rows(LENGTHS, capacity=11)


@pytest.mark.parametrize('seed', range(5))
def test_pack_rows_places_every_sample_once_within_capacity(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (33, ), generator=g).tolist()
    capacity = max(lengths) + int(torch.randint(0, 30, (1, ), generator=g))
    rows = pack_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # Fewer rows than samples, never fewer than the tokens need.
    assert -(-sum(lengths) // capacity) <= len(rows) < len(lengths)


def samples_of(lengths, seed=0, skipped=False):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(5, 175, (n, ), generator=g)
        samples.append(dict(input_ids=ids, labels=ids.clone(), pixel_values=None))
    if skipped:
        samples[1]['skipped'] = [dict(file='a.json', row=3)]
    return samples


def test_packed_collate_layout():
    samples = samples_of([3, 2, 4], skipped=True)
    batch = packed_collate(samples)
    assert batch['attention_mask'] is None and batch['pixel_values'] is None
    assert batch['skipped'] == [dict(file='a.json', row=3)]
    # Rows as long as the longest sample by default: nothing packs here.
    assert batch['input_ids'].shape == (3, 4)
    batch = packed_collate(samples, pack_length=5)  # rows: sample 2 | samples 0 and 1
    assert batch['position_ids'].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    ids, labels = batch['input_ids'], batch['labels']
    assert ids[1].tolist() == samples[0]['input_ids'].tolist() + samples[1]['input_ids'].tolist()
    # Every sample's first label is ignored (never predicted from the previous
    # sample), and so is the padding.
    want = [IGNORE_INDEX] + samples[2]['labels'][1:].tolist() + [IGNORE_INDEX]
    assert labels[0].tolist() == want
    assert labels[1].tolist() == ([IGNORE_INDEX] + samples[0]['labels'][1:].tolist()
                                  + [IGNORE_INDEX] + samples[1]['labels'][1:].tolist())
    with pytest.raises(ValueError, match='text-only'):
        packed_collate([dict(samples[0], pixel_values=torch.zeros(3, 8, 8))])


def text_model(model_type, attn, chunk, mode='vanilla'):
    torch.manual_seed(0)
    return LlavaDPAModel(llm=llm_cfg(model_type, attn), tokenizer=dict(type='TinyTokenizer'),
                         vision_tower=None, loss=dict(type='VisualRelevanceLoss', mode=mode),
                         trainable=('llm', ), loss_chunk_size=chunk).double()


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch)['loss']
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


@pytest.mark.parametrize('chunk', [None, 4])
@pytest.mark.parametrize('model_type,attn', [('llama', 'sdpa'), ('llama', 'eager'),
                                             ('qwen2', 'sdpa')])
def test_packed_loss_and_gradients_equal_padded(model_type, attn, chunk):
    model = text_model(model_type, attn, chunk)
    samples = samples_of(LENGTHS)
    packed = packed_collate(samples)
    assert packed['input_ids'].shape[0] < len(LENGTHS)
    padded = {k: v for k, v in dpa_collate(samples).items() if k != 'pixel_values'}
    packed = {k: v for k, v in packed.items() if k != 'pixel_values'}
    want, want_grads = loss_and_grads(model, padded)
    got, got_grads = loss_and_grads(model, packed)
    assert abs(got - want) < 1e-10
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-10, rtol=1e-8, msg=name)

    # What cuts attention at the sample boundaries is the missing attention mask.
    ones = torch.ones_like(packed['input_ids'])
    with torch.no_grad():
        cut = model.llm(input_ids=packed['input_ids'], position_ids=packed['position_ids'],
                        use_cache=False).logits
        across = model.llm(input_ids=packed['input_ids'], position_ids=packed['position_ids'],
                           attention_mask=ones, use_cache=False).logits
    assert (cut - across).abs().max() > 1e-3


def test_packed_batch_needs_no_image_pass():
    model = text_model('llama', 'sdpa', 4, mode='cmo')
    batch = {k: v for k, v in packed_collate(samples_of(LENGTHS)).items()}
    with pytest.raises(ValueError, match='packed batches'):
        model(**batch)
    with pytest.raises(ValueError, match='attention_mask'):
        model(batch['input_ids'], torch.ones_like(batch['input_ids']), batch['labels'],
              position_ids=batch['position_ids'])


def test_packed_proxy_stage_equals_padded_run(finished, data_root, tmp_path):
    work_dir, manifests = finished
    packed = manifests[0]
    assert packed['stage'] == 'proxy'
    cfg = tiny_config(tmp_path, data_root, stages=['proxy'])
    # The finished run packed its batches: the default recipe sets pack=True.
    packing = stage_runner_config(cfg, 'proxy').train_dataloader.collate_fn
    assert packing == dict(type='dpa.packed_collate')
    cfg.proxy.pack = False
    padded = run_pipeline(cfg)[0]
    assert padded['iterations'] == packed['iterations']
    assert padded['first_loss'] == pytest.approx(packed['first_loss'], rel=1e-5)
    assert padded['last_loss'] == pytest.approx(packed['last_loss'], rel=1e-5)
    got = load_file(f"{packed['artifact']}/adapter_model.safetensors")
    want = load_file(f"{padded['artifact']}/adapter_model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)


def test_pack_is_refused_outside_the_proxy_stage(data_root, tmp_path):
    cfg = tiny_config(tmp_path, data_root, **{'align.pack': True})
    with pytest.raises(ConfigError, match=r'align\.pack=True'):
        run_pipeline(cfg)
