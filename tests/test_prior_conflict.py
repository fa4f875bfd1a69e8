"""The prior-conflict benchmark's parts: its two styles, data, gates and the
result table (the full benchmark runs from tools/prior_conflict.py)."""
import json
import random

import pytest
import torch

from dpa.analysis.prior_conflict import benchmark
from dpa.analysis.prior_conflict.data import make_benchmark_data
from dpa.analysis.prior_conflict.language import (ATTRIBUTES, NATURAL_QUESTIONS, STYLE_B_TOKENS,
                                                  build_tokenizer, corpus_document,
                                                  random_scene, style_a_sentence,
                                                  style_b_caption)
from dpa.analysis.prior_conflict.prior_llm import RECIPE, gates, new_model, passed
from dpa.evaluation.data import read_eval_rows


def test_styles_share_content_words_and_the_corpus_never_shows_style_b():
    tokenizer = build_tokenizer()
    rng = random.Random(0)
    scene = random_scene(rng)
    a, b = style_a_sentence(rng, scene), style_b_caption(scene)
    assert set(scene.values()) <= set(a.split()) & set(b.split())
    assert not set(STYLE_B_TOKENS) & set(a.split())
    documents = [corpus_document(rng, tokenizer) for _ in range(400)]
    ids = [i for d in documents for i in tokenizer(d, add_special_tokens=False).input_ids]
    assert tokenizer.unk_token_id not in ids
    assert not set(tokenizer.convert_tokens_to_ids(list(STYLE_B_TOKENS))) & set(ids)
    # Both context forms and context-free chats occur.
    assert any('shows' in d for d in documents) and any('<|im_start|>' not in d for d in documents)
    assert any(d.startswith('<|im_start|>user\nwhat') for d in documents)


def test_benchmark_data(tmp_path):
    paths = make_benchmark_data(str(tmp_path / 'data'), num_captions=6, num_instructions=5,
                                num_eval=4)
    rows, problems = read_eval_rows(paths['eval'], paths['image_folder'])
    assert not problems and len(rows) == 4 * len(ATTRIBUTES)
    assert {r['type'] for r in rows} == set(ATTRIBUTES)
    assert all(r['answer'] in r['options'] for r in rows)
    control, _ = read_eval_rows(paths['eval_no_image'], paths['image_folder'])
    assert {r['image_path'] for r in control} == {str(tmp_path / 'data' / 'images' / 'blank.png')}
    with open(paths['captions']) as f:
        caption = json.loads(f.readline())['conversations'][1]['value']
    assert caption.startswith('[ ') and ' / ' in caption
    # Cached: a second call with the same parameters does not rewrite.
    stamp = (tmp_path / 'data' / 'params.json').stat().st_mtime_ns
    make_benchmark_data(str(tmp_path / 'data'), num_captions=6, num_instructions=5, num_eval=4)
    assert (tmp_path / 'data' / 'params.json').stat().st_mtime_ns == stamp


def test_natural_wording_asks_in_english_and_keeps_style_b_captions(tmp_path):
    paths = make_benchmark_data(str(tmp_path / 'data'), wording='natural', num_captions=4,
                                num_instructions=6, num_eval=3)
    rows, problems = read_eval_rows(paths['eval'], paths['image_folder'])
    assert not problems and len(rows) == 3 * len(ATTRIBUTES)
    for row in rows:
        assert row['question'] == NATURAL_QUESTIONS[row['type']]
        assert row['answer'] in row['options']
        assert len(row['options']) == len(ATTRIBUTES[row['type']])
    position = next(r for r in rows if r['type'] == 'position')
    assert position['options'][0].startswith('The shape is ') and position['options'][0][-1] == '.'
    with open(paths['instructions']) as f:
        turns = [t for line in f for t in json.loads(line)['conversations']]
    assert {t['value'].replace('<image>\n', '') for t in turns if t['from'] == 'human'} <= set(
        NATURAL_QUESTIONS.values())
    with open(paths['captions']) as f:
        assert json.loads(f.readline())['conversations'][1]['value'].startswith('[ ')
    with pytest.raises(ValueError, match="wording='prose'"):
        make_benchmark_data(str(tmp_path / 'bad'), wording='prose')


def test_real_prior_gates_need_both_conditions():
    from dpa.analysis.prior_conflict.real_prior import GATE, passed
    good = dict(text_accuracy_colour=0.7, text_accuracy_shape=0.9, text_accuracy_position=0.43,
                nll_style_a=4.1, nll_style_b=8.6)
    assert passed(good)
    # Position at 0.39 is under twice its chance (2 / 5).
    assert not passed(dict(good, text_accuracy_position=0.39))
    assert not passed(dict(good, nll_style_b=good['nll_style_a'] + GATE['nll_margin'] - 0.01))


def test_real_prior_gates_run_each_prompt_once_and_score_as_full_sequences(monkeypatch):
    """The real-prior gates score options and captions through the
    evaluator's shared prompt pass: the same values as every full sequence
    (within 1e-5), with one pass over each distinct prompt."""
    from mmengine.config import Config

    from dpa.analysis.prior_conflict import real_prior
    from dpa.evaluation import evaluator
    from dpa.models.builders import PROCESSORS
    from dpa.registry import MODELS
    from tiny import REPO
    tokenizer = PROCESSORS.build(dict(type='TinyTokenizer'))
    torch.manual_seed(0)
    llm = MODELS.build(Config.fromfile(f'{REPO}/configs/_base_/models/tiny_qwen2.py')
                       .llm.to_dict()).eval()
    gate = dict(real_prior.GATE, samples=3)
    passes = []
    prompt_pass = evaluator._score_shared_prompts

    def counted(model, prompts, *args):
        passes.extend(map(tuple, prompts))
        return prompt_pass(model, prompts, *args)

    monkeypatch.setattr(evaluator, '_score_shared_prompts', counted)
    shared = real_prior.gates(llm, tokenizer, gate)
    assert len(passes) == len(set(passes)) == 3 * len(ATTRIBUTES) + 1  # the caption prompt once
    monkeypatch.setattr(real_prior, 'score_continuations',
                        lambda *args: evaluator.score_continuations(*args, share_prompts=False))
    full = real_prior.gates(llm, tokenizer, gate)
    assert shared.keys() == full.keys()
    assert shared == pytest.approx(full, abs=1e-5)


def test_gates_of_an_untrained_prior_fail():
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = new_model(len(tokenizer), RECIPE)
    result = gates(model, tokenizer, dict(RECIPE, gate_samples=6))
    assert set(result) == {f'copy_{a}_{f}' for a in ATTRIBUTES for f in ('sentence', 'bag')} | {
        'style_b_probability'}
    assert all(0 <= v <= 1 for v in result.values())
    assert not passed(result, RECIPE)
    assert passed({**{k: 1.0 for k in result}, 'style_b_probability': 1e-4}, RECIPE)


def _run(variant, seed, mean, no_image=0.2):
    return dict(variant=variant, seed=seed, mean=mean, no_image=no_image,
                accuracy={a: mean for a in ATTRIBUTES}, align_weight_content=0.06,
                align_weight_style=0.05, align_at_min=0.97)


def test_table_pairs_seeds_and_applies_the_gates():
    runs = [_run('vanilla', 0, 0.40), _run('vanilla', 1, 0.30), _run('dpa', 0, 0.50),
            _run('dpa', 1, 0.45)]
    table = benchmark.summarise(runs)
    assert table['variants']['dpa']['paired_vs_vanilla'] == pytest.approx([0.10, 0.15])
    assert table['gates']['passed']
    text = benchmark.format_table(table)
    assert '| dpa |' in text and '+0.150' in text and 'passed' in text
    # mean 0.125, sd 0.0354 over two seeds: t = 0.125 / (0.0354 / sqrt 2) = 5.0
    assert benchmark.paired_t([0.10, 0.15]) == pytest.approx(5.0)
    assert '(mean +0.125, t = +5.00, 1 df)' in text
    assert benchmark.paired_t([0.1]) is None and benchmark.paired_t([0.0, 0.0]) == 0.0
    failing = benchmark.summarise(runs + [_run('cal', 0, 0.3, no_image=0.3)])
    assert not failing['gates']['passed']
    assert 'does not count' in benchmark.format_table(failing)
    assert '0.300 (cal)' in benchmark.format_table(failing)
    assert benchmark.CHANCE == pytest.approx((1 / 6 + 1 / 4 + 1 / 5) / 3)


def test_the_no_image_gate_reads_each_variants_mean_over_seeds():
    # One run's control 0.264 (19 of 72 questions) is within a standard
    # deviation of chance; the variant's mean decides.
    limit = benchmark.CHANCE + benchmark.GATE_NO_IMAGE_MARGIN
    runs = [_run('vanilla', s, 0.8, no_image=0.18) for s in range(3)]
    noisy = [_run('dpa', 0, 0.8, no_image=0.264), _run('dpa', 1, 0.8, no_image=0.18),
             _run('dpa', 2, 0.8, no_image=0.21)]
    table = benchmark.summarise(runs + noisy)
    assert table['gates']['no_image_max'] == pytest.approx(0.264) and 0.264 > limit
    assert table['gates']['no_image_means']['dpa'] == pytest.approx((0.264 + 0.18 + 0.21) / 3)
    assert table['gates']['passed']
    biased = [_run('dpa', s, 0.8, no_image=limit + 0.01) for s in range(3)]
    table = benchmark.summarise(runs + biased)
    assert not table['gates']['passed']
    assert f'{limit:.3f}' in benchmark.format_table(table)


def test_projector_relevance_by_token_class():
    records = [dict(token='red', p_img=0.5, p_txt=0.1, weight=0.4),
               dict(token='pink', p_img=0.3, p_txt=0.1, weight=0.2),
               dict(token='[', p_img=0.9, p_txt=0.7, weight=0.05),
               dict(token='<|im_end|>', p_img=0.7, p_txt=0.5, weight=0.2),
               dict(token='center', p_img=0.2, p_txt=0.1, weight=0.05),
               # Right after the image: no probability without it (p_txt repeats p_img).
               dict(token='[', p_img=0.3, p_txt=0.3, weight=0.05),
               dict(token='top', p_img=0.3, p_txt=0.3, weight=0.05)]
    classes = benchmark.projector_relevance(records)
    assert set(classes) == {'colour', 'position', 'style'}
    assert classes['position']['tokens'] == 1
    assert classes['colour'] == pytest.approx(dict(tokens=2, p_img=0.4, p_txt=0.1, weight=0.3))
    assert classes['style'] == pytest.approx(dict(tokens=2, p_img=0.8, p_txt=0.6, weight=0.125))
    assert benchmark.token_class('diamond') == 'shape'
    # A real tokenizer's tokens keep their leading space.
    assert benchmark.token_class(' diamond') == 'shape' and benchmark.token_class(' /') == 'style'


def test_relevance_table_and_merged_results(tmp_path):
    def with_relevance(run, p_img):
        run['align_relevance'] = {name: dict(tokens=3, p_img=p_img, p_txt=0.1, weight=0.05)
                                  for name in benchmark.TOKEN_CLASSES}
        return run

    first = [with_relevance(_run('vanilla', 0, 0.40), 0.3),
             with_relevance(_run('dpa', 0, 0.5), 0.2)]
    second = [with_relevance(_run('vanilla', 1, 0.30), 0.5),
              with_relevance(_run('dpa', 1, 0.45), 0.4)]
    paths = []
    for name, runs in (('a', first), ('b', second)):
        paths.append(str(tmp_path / f'{name}.json'))
        with open(paths[-1], 'w') as f:
            json.dump(dict(prior=dict(step=1500), runs=runs), f)
    merged = benchmark.merge_results(paths)
    assert merged['table'] == benchmark.summarise(first + second)
    assert merged['table']['variants']['dpa']['paired_vs_vanilla'] == pytest.approx([0.10, 0.15])
    text = benchmark.format_table(merged['table'])
    # The mean over the two seeds: (0.3 + 0.5) / 2 for vanilla, (0.2 + 0.4) / 2 for dpa.
    assert '| vanilla | base LLM | 0.400 / 0.100 |' in text
    assert '| dpa | proxy | 0.300 / 0.100 |' in text
    with pytest.raises(ValueError, match='vanilla seed 0 is in two'):
        benchmark.merge_results([paths[0], paths[0]])


def test_merge_refuses_results_of_other_settings(tmp_path):
    def write(name, seed, **settings):
        path = str(tmp_path / f'{name}.json')
        with open(path, 'w') as f:
            json.dump(dict(prior={}, runs=[_run('vanilla', seed, 0.5)], **settings), f)
        return path

    data = benchmark.data_params('smollm2')
    same = dict(prior_llm='smollm2', cfg_options=['align.max_epochs=10'], data=data)
    merged = benchmark.merge_results([write('a', 0, **same), write('b', 1, **same)])
    assert {k: merged[k] for k in same} == same  # the table says what it was run with
    longer = dict(same, cfg_options=['align.max_epochs=20'])
    with pytest.raises(ValueError, match='cfg_options.*align.max_epochs=20'):
        benchmark.merge_results([write('c', 0, **same), write('d', 1, **longer)])
    other_data = dict(same, data=dict(data, num_eval=48))
    with pytest.raises(ValueError, match='different settings.*data'):
        benchmark.merge_results([write('e', 0, **same), write('f', 1, **other_data)])
    with pytest.raises(ValueError, match='prior_llm'):
        benchmark.merge_results([write('g', 0, **same), write('h', 1, prior_llm='toy')])


def test_weight_budget_and_merge_summarises_again_from_the_records(tmp_path):
    records = [dict(token=' red', p_img=0.5, p_txt=0.1, delta=0.4, weight=0.3),
               dict(token=' circle', p_img=0.2, p_txt=0.18, delta=0.02, weight=0.05),
               dict(token=' [', p_img=0.9, p_txt=0.9, delta=0.0, weight=0.05),
               dict(token=' /', p_img=0.9, p_txt=0.88, delta=0.02, weight=0.1)]
    budget = benchmark.weight_budget(records, 0.05)
    assert budget['colour'] == pytest.approx(dict(token_share=0.25, loss_share=0.6,
                                                  below_floor=0.0, at_floor=0.0))
    assert budget['style'] == pytest.approx(dict(token_share=0.5, loss_share=0.3,
                                                 below_floor=1.0, at_floor=0.5))
    assert budget['shape']['at_floor'] == 1.0

    run = _run('dpa', 0, 0.5)
    with open(tmp_path / 'results.json', 'w') as f:
        json.dump(dict(prior={}, prior_llm='toy', runs=[run]), f)
    (tmp_path / 'dpa_seed0' / 'relevance').mkdir(parents=True)
    with open(tmp_path / 'dpa_seed0' / 'relevance' / 'tokens.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    merged = benchmark.merge_results([str(tmp_path / 'results.json')])
    entry = merged['table']['variants']['dpa']
    assert entry['align_budget']['colour']['loss_share'] == pytest.approx(0.6)
    assert entry['align_relevance']['colour']['p_img'] == [0.5]
    text = benchmark.format_table(merged['table'])
    assert '| dpa | colour | 0.250 | 0.600 | 0.000 | 0.000 |' in text


# What each variant is, stage by stage: (runs the proxy stage, align trains
# against the proxy, align loss, finetune loss).
VARIANT_SHAPES = {'vanilla': (False, False, 'vanilla', 'vanilla'),
                  'cal': (False, False, 'cal', 'cal'),
                  'pmo_only': (True, True, 'vanilla', 'vanilla'),
                  'cmo_only': (False, False, 'cmo', 'cmo'),
                  'dpa': (True, True, 'cmo', 'cmo'),
                  'pmo_cmo_align': (True, True, 'cmo', 'vanilla'),
                  'pmo_cmo_finetune': (True, True, 'vanilla', 'cmo')}


@pytest.mark.parametrize('prior', sorted(benchmark.PRIORS))
def test_every_variant_config_plans_what_it_names(tmp_path, prior):
    from mmengine.config import Config

    from dpa.engine.dry_run import dry_run
    assert set(VARIANT_SHAPES) == set(benchmark.ALL_VARIANTS)
    root = tmp_path / benchmark.PRIORS[prior]['root']
    if prior == 'toy':
        tokenizer = build_tokenizer()
        new_model(len(tokenizer), RECIPE).save_pretrained(root / 'prior_llm')
        tokenizer.save_pretrained(root / 'prior_llm')
    make_benchmark_data(str(root / 'data'), **dict(benchmark.PRIORS[prior]['data'],
                                                   num_captions=6, num_instructions=5,
                                                   num_eval=2))
    for variant, (proxy, use_proxy, align_loss, finetune_loss) in VARIANT_SHAPES.items():
        cfg = Config.fromfile(benchmark.variant_config(variant, prior))
        cfg.data_root, cfg.work_dir = str(tmp_path), str(tmp_path / variant)
        plan = dry_run(cfg)  # every check the run makes before loading a model
        sections = {part.split(']')[0]: part for part in plan.split('\n[')[1:]}
        assert ('proxy' in sections) == proxy, variant
        assert (variant in benchmark.USES_PROXY) == use_proxy, variant
        assert ('llm_adapter of stage proxy' in sections['align']) == use_proxy, variant
        assert f'loss: {align_loss}' in sections['align'], variant
        assert f'loss: {finetune_loss}' in sections['finetune'], variant


def test_extra_cfg_options_are_checked_first_and_reach_every_run():
    from dpa.errors import ConfigError
    with pytest.raises(ConfigError, match='dpa: .*align.max_epoch.*did you mean'):
        benchmark.check_options(['dpa', 'cmo_only'], ['align.max_epochs=16',
                                                      'align.max_epoch=16'])
    benchmark.check_options(list(VARIANT_SHAPES), ['align.max_epochs=16',
                                                   'align.loss.clamp=(0.01,0.5)'])
    options = benchmark._options('dpa', 3, '/data', '/out', ['align.max_epochs=16'])
    assert options == ['seed=3', 'data_root=/data', 'align.max_epochs=16',
                       'proxy.from_work_dir=/out/proxy_seed3']
