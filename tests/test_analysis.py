"""The analysis tools: per-token relevance records that are exactly what the
loss computes, their HTML and plots, and the language-prior diagnostic."""
import json
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config

import dpa  # noqa: F401
from dpa.analysis.commands import analyze_relevance, resolve_config
from dpa.analysis.prior import diagnose_prior, format_prior_table, verdict
from dpa.analysis.relevance import analysis_rows, token_records
from dpa.datasets.llava import LLaVADataset, dpa_collate
from dpa.datasets.synthetic import make_synthetic_data
from dpa.models.losses import VisualRelevanceLoss
from dpa.models.mllm import LlavaDPAModel
from tiny import tiny_config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
QWEN2 = Config.fromfile(osp.join(REPO, 'configs/_base_/models/tiny_qwen2.py'))
CLIP = Config.fromfile(osp.join(REPO, 'configs/_base_/models/tiny_clip.py'))
TOKENIZER = dict(type='TinyTokenizer')


@pytest.fixture(scope='module')
def model_and_samples(tmp_path_factory):
    """A tiny model whose image visibly moves token probabilities, and chat
    samples with images (several answer spans each)."""
    model = LlavaDPAModel(llm=QWEN2.llm.to_dict(), tokenizer=TOKENIZER,
                          vision_tower=CLIP.vision_tower.to_dict(), trainable=['projector'])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.projector.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 3)
    paths = make_synthetic_data(tmp_path_factory.mktemp('data'), num_captions=4,
                                num_instructions=6, image_size=32, num_eval=4)
    dataset = LLaVADataset(data_files=paths['instructions'], tokenizer=TOKENIZER,
                           template='chat', image_folder=paths['image_folder'],
                           image_processor=CLIP.image_processor.to_dict(),
                           num_image_tokens=16, max_length=256, pad_to_square=True)
    samples, skipped = analysis_rows(dataset, 3)
    assert len(samples) == 3 and not skipped
    return model.eval(), samples, dataset.tokenizer


@pytest.mark.parametrize('loss_args', [dict(mode='cmo', clamp=(-1.0, 1.0)),
                                       dict(mode='cmo'),
                                       dict(mode='cal', clamp=(-5.0, 5.0))])
def test_records_reproduce_the_training_loss(model_and_samples, loss_args):
    """sum(weight * -log p_img) / sum(weight) over a sample's records is the
    loss training computes on that sample: weights, probabilities and
    positions are the loss's own."""
    model, samples, tokenizer = model_and_samples
    loss = VisualRelevanceLoss(**loss_args)
    model.loss_fn = loss
    records = token_records(model, loss, samples, tokenizer)
    weights = [r['weight'] for r in records]
    if loss_args.get('clamp', (0.05,))[0] < 0:  # nothing clamped: every weight its own
        assert len(set(weights)) > len(weights) // 2
    for row_id, sample in samples:
        mine = [r for r in records if r['id'] == row_id]
        assert len(mine) == int((sample['labels'][1:] != -100).sum())
        batch = dpa_collate([sample])
        with torch.no_grad():
            expected = model(batch['input_ids'], batch['attention_mask'], batch['labels'],
                             batch['pixel_values'])['loss']
        w = torch.tensor([r['weight'] for r in mine], dtype=torch.float64)
        ce = -torch.tensor([r['p_img'] for r in mine], dtype=torch.float64).log()
        recomputed = float((w * ce).sum() / (w.sum() + loss.eps))
        assert recomputed == pytest.approx(float(expected), rel=1e-5)
        for r in mine:
            assert sample['input_ids'][r['position']] == r['token_id']
            assert r['token'] == tokenizer.decode([r['token_id']])


def test_vanilla_records_weigh_every_token_one(model_and_samples):
    model, samples, tokenizer = model_and_samples
    records = token_records(model, VisualRelevanceLoss(mode='vanilla'), samples, tokenizer)
    assert {r['weight'] for r in records} == {1.0}
    assert all(r['delta'] == pytest.approx(r['p_img'] - r['p_txt'], abs=1e-6) for r in records)
    assert any(abs(r['delta']) > 1e-5 for r in records)


def test_analyze_relevance_writes_records_html_and_plots(finished, data_root, tmp_path):
    work_dir, _ = finished
    out = tmp_path / 'relevance'
    result = analyze_relevance(tiny_config(work_dir, data_root), 'align', ['base', 'proxy'],
                               num=3, out_dir=str(out))
    with open(out / 'tokens.jsonl') as f:
        records = [json.loads(line) for line in f]
    assert {r['model'] for r in records} == {'base', 'proxy'}
    assert set(records[0]) == {'model', 'id', 'position', 'token', 'token_id', 'p_img',
                               'p_txt', 'delta', 'weight'}
    base = [r for r in records if r['model'] == 'base']
    proxy = [r for r in records if r['model'] == 'proxy']
    assert [(r['id'], r['position']) for r in base] == [(r['id'], r['position']) for r in proxy]
    # The proxy is another LLM: its probabilities differ on the same tokens.
    assert any(abs(a['p_txt'] - b['p_txt']) > 1e-6 for a, b in zip(base, proxy))
    assert all(0.05 <= r['weight'] <= 0.5 for r in records)
    html = (out / 'relevance.html').read_text()
    assert html.count('class="t"') == len(records) and 'p_img=' in html
    for name in ('delta_hist_base.png', 'word_weights_proxy.png', 'compare_base_proxy.png'):
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert result['models']['base']['tokens'] == len(base)
    assert 'align stage\'s projector' in result['models']['proxy']['description']


def test_analyze_relevance_of_an_anyres_model(finished, data_root, tmp_path):
    """AnyRes rows have their own number of image tokens: the analysis model
    merges tiles with the rows' image sizes, as training does."""
    anyres_config = osp.join(REPO, 'configs', 'dpa_tiny_anyres.py')
    cfg = tiny_config(tmp_path / 'anyres', data_root, path=anyres_config)
    result = analyze_relevance(cfg, 'align', ['base'], num=3, out_dir=str(tmp_path / 'out'))
    assert result['samples'] == 3 and result['models']['base']['tokens'] > 0
    with open(tmp_path / 'out' / 'tokens.jsonl') as f:
        records = [json.loads(line) for line in f]
    # The image moves the probabilities (an anyres model that dropped the image would not).
    assert any(abs(r['p_img'] - r['p_txt']) > 1e-6 for r in records)


def test_analyze_relevance_refuses_what_it_cannot_run(tmp_path, data_root):
    cfg = tiny_config(tmp_path / 'empty', data_root)
    with pytest.raises(Exception, match='stage .proxy.'):
        analyze_relevance(cfg, 'align', ['proxy'], num=1, out_dir=str(tmp_path / 'out'))
    with pytest.raises(ValueError, match='one or two different'):
        analyze_relevance(cfg, 'align', ['base', 'base'], num=1, out_dir=str(tmp_path / 'o'))


def test_prior_diagnostic_on_the_tiny_default(finished, data_root):
    work_dir, _ = finished
    cfg = resolve_config(tiny_config(work_dir, data_root))
    result = diagnose_prior(cfg, num=5)
    (name, source), = result['sources'].items()
    assert source['rows'] == 5 and source['tokens'] > 20
    # A random tiny LLM sits at chance: log(512) nats per token, said as such.
    assert source['nll_base'] == pytest.approx(math.log(512), rel=0.05)
    assert 'no better than chance' in source['verdict']
    assert source['nll_proxy'] != source['nll_base']
    assert result['proxy'] is not None
    assert name in format_prior_table(result)


def test_prior_verdicts():
    assert verdict(0.5, 2.0, 32000).startswith('strong')
    assert verdict(0.2, 2.0, 32000).startswith('moderate')
    assert verdict(0.05, 2.0, 32000).startswith('weak')
    assert 'chance' in verdict(0.05, 0.95 * math.log(32000), 32000)


# --------------------------------------------------------------------------- #
# Statistics by token class, and the weight histogram in TensorBoard
# --------------------------------------------------------------------------- #

def test_content_token_rule():
    from dpa.models.builders import PROCESSORS
    from dpa.models.token_classes import content_token_mask
    tokenizer = PROCESSORS.build(TOKENIZER)
    mask = content_token_mask(tokenizer, len(tokenizer) + 3)
    ids = tokenizer.convert_tokens_to_ids
    assert mask[ids('red')] and mask[ids('circle')] and mask[ids('7')]
    assert not mask[ids('.')] and not mask[ids(' ')] and not mask[ids('<|im_end|>')]
    assert not mask[ids('<image>')] and not mask[len(tokenizer):].any()


def test_cmo_statistics_split_by_token_class():
    loss = VisualRelevanceLoss(mode='cmo', clamp=(0.0, 1.0), window=1)
    loss.content_tokens = torch.tensor([False, True, True, False])
    targets = torch.tensor([[1, 3, 2, 0, -100]])
    p_img = torch.tensor([[0.9, 0.5, 0.6, 0.2, 0.3]])
    p_txt = torch.tensor([[0.1, 0.4, 0.1, 0.1, 0.3]])
    # One "output" per position, the probability itself; the score function
    # returns its log as the target's log-probability (and logit).
    outputs, text_outputs = p_img.unsqueeze(-1), p_txt.view(5, 1)
    text_index = torch.arange(5).view(1, 5)

    def score_fn(rows, ids):
        return rows[:, 0].log(), rows[:, 0].log()

    out = loss(outputs, targets, text_outputs, text_index, score_fn=score_fn)
    delta = (p_img - p_txt)[0, :4]
    assert out['cmo_w_mean_content'].item() == pytest.approx(float((delta[0] + delta[2]) / 2))
    assert out['cmo_w_mean_template'].item() == pytest.approx(float((delta[1] + delta[3]) / 2))
    assert out['cmo_delta_mean_content'].item() == pytest.approx(float((delta[0] + delta[2]) / 2))
    only_content = loss(outputs[:, :1], targets[:, :1], text_outputs[:1], text_index[:, :1],
                        score_fn=score_fn)
    assert 'cmo_w_mean_content' in only_content and 'cmo_w_mean_template' not in only_content


def test_align_stage_logs_class_statistics_and_weight_histogram(tmp_path, data_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from dpa.engine.pipeline import run_pipeline
    cfg = tiny_config(tmp_path / 'work', data_root, stages=['align'])
    cfg.align.use_proxy = False
    cfg.visualizer.vis_backends = [dict(type='LocalVisBackend'),
                                   dict(type='TensorboardVisBackend')]
    cfg.default_hooks.logger.interval = 1
    (manifest, ) = run_pipeline(cfg)
    assert {'w_mean_content', 'w_mean_template', 'delta_mean_content',
            'delta_mean_template'} <= set(manifest['cmo'])
    events = sorted((tmp_path / 'work' / 'align').glob('*/vis_data/events.out.tfevents.*'))
    assert events
    accumulator = EventAccumulator(str(events[0].parent), size_guidance={'histograms': 0})
    accumulator.Reload()
    histograms = accumulator.Histograms('align/cmo_weight')
    assert len(histograms) == manifest['iterations']
    assert histograms[0].histogram_value.min >= 0.05 - 1e-6


def test_seed_option_seeds_the_runner(tmp_path, data_root):
    from dpa.engine.stage_config import stage_runner_config
    cfg = tiny_config(tmp_path, data_root, seed=7)
    runner_cfg = stage_runner_config(cfg, 'proxy')
    assert runner_cfg.randomness.seed == 7
    assert runner_cfg.train_dataloader.sampler.seed == 7
    assert stage_runner_config(tiny_config(tmp_path, data_root), 'proxy').randomness.seed == 0


def test_a_stage_of_another_work_dir_is_reused(finished, data_root, tmp_path):
    """`proxy.from_work_dir`: ablations of one seed share stage 1."""
    from dpa.errors import ConfigError
    from dpa.engine.pipeline import run_pipeline
    from dpa.engine.summary import format_summary
    source, _ = finished
    cfg = tiny_config(tmp_path / 'b', data_root, stages=['proxy', 'align'])
    cfg.proxy.from_work_dir = str(source)
    proxy, align = run_pipeline(cfg)
    assert proxy['reused_from'] == str(source) and proxy['skipped']
    assert not (tmp_path / 'b' / 'proxy').exists()
    assert align['made_from']['llm_adapter'] == osp.join(str(source), 'proxy', 'artifact')
    assert f'reused from {source}' in format_summary([proxy, align])
    # The analysis finds the reused proxy where the run did.
    result = analyze_relevance(cfg, 'align', ['proxy'], num=1, out_dir=str(tmp_path / 'rel'))
    assert align['artifact'] in result['models']['proxy']['description']
    assert result['models']['proxy']['tokens'] > 0
    cfg = tiny_config(tmp_path / 'c', data_root, stages=['proxy', 'align'])
    cfg.proxy.from_work_dir = str(tmp_path / 'nowhere')
    with pytest.raises(ConfigError, match='holds no finished .proxy. stage'):
        run_pipeline(cfg)
