"""Attention kernels: each family's stand-in computes the same loss under every
kernel this CPU runs (padded image batches and packed stage-1 rows), the
configs' preference lists fall back with a reason, and stage-1 packing puts a
batch in one row where flash attention's variable-length path needs it."""
import logging

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger

import dpa  # noqa: F401
from dpa.datasets.llava import LLaVADataset, dpa_collate
from dpa.datasets.packing import packed_collate
from dpa.engine.stage_config import stage_collate_config
from dpa.models import attention
from dpa.models.attention import resolve_attn_implementation
from dpa.models.mllm import LlavaDPAModel
from test_families import rows_file  # noqa: F401  (the fixture)
from test_families import (FAMILY_BASES, family_llm, family_tokenizer, image_and_text_batch,
                           vision_parts)
from tiny import REPO

CPU_KERNELS = ('eager', 'sdpa')
SOFTCAPPED = ('gemma2', )


# Tiny matrices gain nothing from intra-op threads on a busy machine.
pytestmark = pytest.mark.usefixtures('one_thread')


def build(family, kernel):
    torch.manual_seed(1)  # the projector draws from the global generator
    model = LlavaDPAModel(llm={**family_llm(family), 'attn_implementation': kernel},
                          tokenizer=family_tokenizer(family), vision_tower=vision_parts()[0],
                          loss=dict(type='VisualRelevanceLoss', mode='vanilla'),
                          trainable=['llm', 'projector'])
    return model.double().eval()


def caption_samples(family, rows_file):  # noqa: F811
    path, folder = rows_file
    dataset = LLaVADataset(data_files=[path], image_folder=folder, template='caption_text',
                           tokenizer=family_tokenizer(family))
    return [dataset.prepare_data(0), dataset.prepare_data(1)]


def losses(model, image_batch, samples):
    padded = dpa_collate(samples)
    with torch.no_grad():
        out = [model(image_batch['input_ids'], image_batch['attention_mask'],
                     image_batch['labels'], image_batch['pixel_values'])['loss'],
               model(padded['input_ids'], padded['attention_mask'], padded['labels'])['loss']]
        for one_row in (False, True):
            packed = packed_collate(samples, one_row=one_row)
            out.append(model(packed['input_ids'], None, packed['labels'],
                             position_ids=packed['position_ids'])['loss'])
    return torch.stack(out)


@pytest.mark.parametrize('family', sorted(FAMILY_BASES))
def test_every_cpu_kernel_gives_the_same_loss(family, rows_file):  # noqa: F811
    image_batch = image_and_text_batch(family, rows_file)
    samples = caption_samples(family, rows_file)
    kernels = [k for k in CPU_KERNELS if not (family in SOFTCAPPED and k == 'sdpa')]
    results = {kernel: losses(build(family, kernel), image_batch, samples) for kernel in kernels}
    for kernel, got in results.items():
        assert torch.isfinite(got).all(), kernel
        # float64; sdpa's CPU kernel differs from eager's by ~1e-9, and packed
        # from padded rows by up to 1.5e-9 (measured 2026-12 with transformers
        # 5.25; under 1e-10 with the versions of 2026-11): a kernel that lets
        # packed samples see each other moves the loss by ~1e-2.
        # Padded and packed (several rows, one row) captions: the same loss.
        torch.testing.assert_close(got[2:], got[1].expand(2), rtol=0, atol=1e-8)
        torch.testing.assert_close(got, results['eager'], rtol=0, atol=1e-8, msg=kernel)
    assert len(results) == (1 if family in SOFTCAPPED else 2)


def test_sdpa_is_refused_for_gemma2_soft_capping():
    message = 'Gemma2ForCausalLM does not support .*scaled_dot_product_attention'
    with pytest.raises(ValueError, match=message):
        build('gemma2', 'sdpa')


def test_every_family_config_names_kernels_that_keep_its_computation():
    for family, base in FAMILY_BASES.items():
        choice = Config.fromfile(f'{REPO}/configs/_base_/models/{base}').llm.attn_implementation
        choices = [choice] if isinstance(choice, str) else choice
        assert choices[-1] in CPU_KERNELS  # a fallback every machine runs
        if family in SOFTCAPPED:
            assert set(choices) <= set(attention.SOFTCAP_KERNELS)


def test_preferences_fall_back_with_the_reason(monkeypatch):
    monkeypatch.setattr(attention.importlib.util, 'find_spec',
                        lambda name: None if name == 'flash_attn' else object())
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert resolve_attn_implementation(['flash_attention_2', 'sdpa']) == 'sdpa'
    finally:
        logger.removeHandler(handler)
    assert any('flash-attn package is not installed' in r.getMessage() for r in records)
    with pytest.raises(ValueError, match="flash-attn package is not installed.*add 'sdpa'"):
        resolve_attn_implementation('flash_attention_2')
    with pytest.raises(ValueError, match="unknown attention kernel 'flash2'"):
        resolve_attn_implementation(['flash2', 'sdpa'])


def test_stage1_packs_one_row_per_batch_under_flash_attention(monkeypatch):
    cfg = Config(dict(llm=dict(attn_implementation=['flash_attention_2', 'sdpa']),
                      proxy=dict(pack=True), align=dict()))
    monkeypatch.setattr(attention, 'kernel_unavailable', lambda kernel: '')
    assert stage_collate_config(cfg, 'proxy') == dict(type='dpa.packed_collate', one_row=True)
    monkeypatch.setattr(attention, 'kernel_unavailable',
                        lambda kernel: 'absent' if kernel == 'flash_attention_2' else '')
    assert stage_collate_config(cfg, 'proxy') == dict(type='dpa.packed_collate')
    assert stage_collate_config(cfg, 'align') == dict(type='dpa.dpa_collate')
    rows = packed_collate([dict(input_ids=torch.arange(n), labels=torch.arange(n))
                           for n in (3, 5, 4)], one_row=True)
    assert rows['input_ids'].shape == (1, 12)
    assert rows['position_ids'].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]]
