"""The evaluator (tools/eval.py, dpa.evaluation): the synthetic held-out split,
option scores against a hand computation from the model's full logits, batch
size invariance, native and hf_llava agreement, one pass over the prompt per
row (scores equal to the full sequences'), generation, bad rows, the
pipeline's eval stage and the lmms-eval bridge's files."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

import dpa  # noqa: F401
from dpa.datasets.llava import LLaVADataset
from dpa.datasets.synthetic import EVAL_OPTIONS, make_synthetic_data
from dpa.errors import ConfigError
from dpa.engine.pipeline import run_pipeline
from dpa.engine.preflight import selected_stages
from dpa.engine.summary import format_summary
from dpa.evaluation import (BadRowsError, EvalDataError, compute_metrics, evaluate,
                            load_eval_model, normalize_answer, predict, read_eval_rows)
from dpa.evaluation.lmms_eval import (LmmsEvalError, agreement, choose_model, log_errors,
                                      read_results, write_local_tasks)
from dpa.evaluation.evaluator import group_batches, option_ids, score_continuations
from dpa.evaluation.models import load_image
from dpa.evaluation.stage import check_eval_config
from dpa.models.builders import IMAGE_TOKEN, PROCESSORS
from dpa.models.export import export_llava, save_native
from dpa.models.mllm import LlavaDPAModel

from tiny import REPO, tiny_config

MODELS = osp.join(REPO, 'configs', '_base_', 'models')
QWEN2 = Config.fromfile(osp.join(MODELS, 'tiny_qwen2.py'))
CLIP = Config.fromfile(osp.join(MODELS, 'tiny_clip.py'))
TOKENIZER = dict(type='TinyTokenizer')


@pytest.fixture(scope='module')
def eval_data(tmp_path_factory):
    """The synthetic split (12 rows) plus open questions, one on a non-square image."""
    root = tmp_path_factory.mktemp('evaldata') / 'syn'
    paths = make_synthetic_data(root, num_captions=4, num_instructions=4, num_eval=12,
                                image_size=32, seed=3)
    Image.new('RGB', (40, 24), 'red').save(osp.join(paths['image_folder'], 'wide.png'))
    rows = [json.loads(line) for line in open(paths['eval'])]
    rows += [dict(id='open_0', image='wide.png', question='What colour is the shape?',
                  answer='The shape is red.', type='open'),
             dict(id='open_1', image=rows[0]['image'], question='Where is the shape?',
                  answer='anything'),
             dict(id='text_0', question='What is 1 plus 2?', answer='3')]
    data = str(root / 'mixed.jsonl')
    with open(data, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    return dict(paths, mixed=data)


def build_model(seed=1):
    model = LlavaDPAModel(llm=QWEN2.llm.to_dict(), tokenizer=TOKENIZER,
                          vision_tower=CLIP.vision_tower.to_dict(),
                          trainable=['llm', 'projector'])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a fresh projector barely lets the image matter
        for param in model.projector.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.fixture(scope='module')
def model_dirs(tmp_path_factory):
    model = build_model()
    tokenizer = PROCESSORS.build(TOKENIZER)
    image_processor = PROCESSORS.build(CLIP.image_processor.to_dict())
    native = str(tmp_path_factory.mktemp('model') / 'native')
    save_native(model, tokenizer, image_processor, native)
    export_llava(model, tokenizer, image_processor, osp.join(native, 'hf_llava'))
    return dict(model=model, tokenizer=tokenizer, image_processor=image_processor,
                native=native, hf=osp.join(native, 'hf_llava'))


@pytest.fixture(scope='module')
def native_model(model_dirs):
    return load_eval_model(model_dirs['native'], 'cpu', pad_to_square=True)


# --------------------------------------------------------------------------- #
# The synthetic held-out split
# --------------------------------------------------------------------------- #

def test_synthetic_eval_split_is_held_out(eval_data):
    rows = [json.loads(line) for line in open(eval_data['eval'])]
    assert len(rows) == 12
    assert [r['type'] for r in rows[:3]] == ['colour', 'shape', 'position']
    train_images = set()
    for name in ('captions', 'instructions'):
        with open(eval_data[name]) as f:
            text = f.read()
        train_images |= {row['image'] for row in (json.loads(text) if name == 'captions' else
                                                  map(json.loads, text.splitlines()))
                         if 'image' in row}
    folder = eval_data['image_folder']
    train_pixels = [np.asarray(Image.open(osp.join(folder, n))) for n in train_images]
    for row in rows:
        assert set(row) == {'id', 'image', 'question', 'answer', 'options', 'type'}
        assert len(row['options']) == EVAL_OPTIONS == len(set(row['options']))
        assert row['answer'] in row['options']
        assert row['image'] not in train_images
        pixels = np.asarray(Image.open(osp.join(folder, row['image'])))
        assert not any(np.array_equal(pixels, p) for p in train_pixels)
    # The split leaves the training rows exactly as they were without it.
    alone = make_synthetic_data(osp.join(osp.dirname(eval_data['eval']), '..', 'alone'),
                                num_captions=4, num_instructions=4, num_eval=0, image_size=32,
                                seed=3)
    for name in ('captions', 'instructions'):
        assert open(alone[name]).read() == open(eval_data[name]).read()


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #

def _full_logits(model, ids, pixels):
    ids = torch.tensor([ids])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), pixel_values=pixels[None], mode='tensor')[0]


def test_prompt_is_what_training_feeds(model_dirs, native_model, eval_data):
    row = read_eval_rows(eval_data['mixed'], eval_data['image_folder'])[0][-3]  # wide image
    ids, pixels = native_model.prompt(row['question'], load_image(row['image_path']))
    dataset = LLaVADataset(
        data_files=[], tokenizer=TOKENIZER, template='chat', image_processor=CLIP.image_processor,
        image_folder=eval_data['image_folder'], num_image_tokens=16, pad_to_square=True,
        lazy_init=True)
    sample = dataset.tokenize(dict(image='wide.png', conversations=[
        dict(**{'from': 'human', 'value': IMAGE_TOKEN + '\n' + row['question']}),
        dict(**{'from': 'gpt', 'value': row['answer']})]))
    assert sample['input_ids'][:len(ids)].tolist() == ids
    assert torch.equal(sample['pixel_values'], pixels)
    # The training sample goes on with the answer: the prompt ends where it starts.
    answer = model_dirs['tokenizer'](row['answer'], add_special_tokens=False).input_ids
    assert sample['input_ids'][len(ids):len(ids) + len(answer)].tolist() == answer


def test_option_scores_equal_hand_computation_from_full_logits(model_dirs, native_model,
                                                               eval_data):
    rows, _ = read_eval_rows(eval_data['eval'], eval_data['image_folder'])
    row = rows[0]
    [record] = predict(native_model, [row], batch_size=3, show_progress=False)
    model, tokenizer = model_dirs['model'], model_dirs['tokenizer']
    prompt, pixels = native_model.prompt(row['question'], load_image(row['image_path']))
    expected = {}
    for option in row['options']:
        option_ids = tokenizer(option, add_special_tokens=False).input_ids
        logps = torch.log_softmax(_full_logits(model, prompt + option_ids, pixels), dim=-1)
        expected[option] = sum(float(logps[len(prompt) + j - 1, token])
                               for j, token in enumerate(option_ids))
    assert record['option_scores'].keys() == expected.keys()
    for option, score in expected.items():
        assert record['option_scores'][option] == pytest.approx(score, abs=1e-4)
    best = max(row['options'], key=expected.get)
    assert record['prediction'] == best
    assert record['correct'] == (best == row['answer'])
    # The image matters to the scores: another image changes them.
    other = dict(row, image_path=rows[1]['image_path'])
    [moved] = predict(native_model, [other], batch_size=3, show_progress=False)
    assert max(abs(moved['option_scores'][o] - expected[o]) for o in expected) > 1e-3


def test_ties_go_to_the_first_option(native_model, eval_data):
    rows, _ = read_eval_rows(eval_data['eval'], eval_data['image_folder'])
    # Two characters outside the tiny vocabulary: the same <unk> id, the same score.
    tokenizer = native_model.tokenizer
    assert tokenizer('\u00e9', add_special_tokens=False).input_ids == \
        tokenizer('\u00fc', add_special_tokens=False).input_ids
    row = dict(rows[0], options=['It is a circle.', '\u00e9', '\u00fc'], answer='\u00fc')
    [record] = predict(native_model, [row], show_progress=False)
    scores = record['option_scores']
    assert scores['\u00e9'] == scores['\u00fc']
    if scores['\u00e9'] < scores['It is a circle.']:  # keep the tie on top
        row['options'] = ['\u00e9', '\u00fc']
        [record] = predict(native_model, [row], show_progress=False)
    assert record['prediction'] == '\u00e9' and not record['correct']


def test_batch_size_does_not_change_predictions(native_model, eval_data):
    rows, problems = read_eval_rows(eval_data['mixed'], eval_data['image_folder'])
    assert not problems
    # 16 new tokens are enough to see a padding-dependent answer, and faster than 64.
    one = predict(native_model, rows, batch_size=1, show_progress=False, max_new_tokens=16)
    four = predict(native_model, rows, batch_size=4, show_progress=False, max_new_tokens=16)
    assert [r['prediction'] for r in one] == [r['prediction'] for r in four]
    assert [r['correct'] for r in one] == [r['correct'] for r in four]
    for a, b in zip(one, four):
        if 'option_scores' in a:
            assert a['option_scores'] == pytest.approx(b['option_scores'], abs=1e-4)
    assert any(r['prediction'] for r in one if 'option_scores' not in r)


def test_generation_is_the_greedy_continuation_cut_at_end_of_turn(
        model_dirs, native_model, eval_data):
    rows, _ = read_eval_rows(eval_data['mixed'], eval_data['image_folder'])
    row = rows[-2]  # open question with an image
    ids, pixels = native_model.prompt(row['question'], load_image(row['image_path']))
    model, tokenizer = model_dirs['model'], model_dirs['tokenizer']
    greedy = list(ids)
    for _ in range(8):  # the reference: full forward passes, no cache, no padding
        greedy.append(int(_full_logits(model, greedy, pixels)[-1].argmax()))
    new = greedy[len(ids):]
    assert native_model.generate([ids], [pixels], 8)[0] == new
    # With the third generated token as end of turn, the answer stops before it.
    stop = new[2]
    saved = native_model.end_of_turn_ids
    try:
        native_model.end_of_turn_ids = [stop]
        [record] = predict(native_model, [row], show_progress=False)
    finally:
        native_model.end_of_turn_ids = saved
    cut = new[:new.index(stop)]
    assert record['prediction'] == tokenizer.decode(cut, skip_special_tokens=True).strip()
    # Correct when equal up to case and surrounding punctuation and whitespace.
    native_model.end_of_turn_ids = [stop]
    try:
        right, wrong = predict(native_model, [
            dict(row, answer=' ' + record['prediction'].upper() + '!? '),
            dict(row, answer=record['prediction'] + ' extra')], show_progress=False)
    finally:
        native_model.end_of_turn_ids = saved
    assert right['correct'] and not wrong['correct']


def test_end_of_turn_ids_hold_the_chat_template_end(native_model):
    im_end = native_model.tokenizer.convert_tokens_to_ids('<|im_end|>')
    assert native_model.end_of_turn_ids[0] == im_end


def test_native_and_hf_llava_export_agree(model_dirs, native_model, eval_data):
    rows, _ = read_eval_rows(eval_data['eval'], eval_data['image_folder'])
    hf = load_eval_model(model_dirs['hf'], 'cpu')
    assert hf.kind == 'hf_llava'
    for row in rows[:4]:
        ours = native_model.prompt(row['question'], load_image(row['image_path']))
        theirs = hf.prompt(row['question'], load_image(row['image_path']))
        assert ours[0] == theirs[0] and torch.equal(ours[1], theirs[1])
    a = predict(native_model, rows, batch_size=4, show_progress=False)
    b = predict(hf, rows, batch_size=4, show_progress=False)
    assert [r['prediction'] for r in a] == [r['prediction'] for r in b]
    for x, y in zip(a, b):
        assert x['option_scores'] == pytest.approx(y['option_scores'], abs=1e-4)


# --------------------------------------------------------------------------- #
# One pass over the prompt per row
# --------------------------------------------------------------------------- #

LONG_OPTION = 'It is a small red circle near the top left corner of the picture.'


def _mixed_items(model, rows):
    """Scoring items with every case the shared prompt pass must get right:
    each row's prompt with its image and without (text only, made 0 to 2
    sentences longer, so the left padding varies), options of one to many
    tokens, and the model's own greedy continuation (one and three tokens,
    whose ``greedy`` is True)."""
    items = []
    for k, row in enumerate(rows):
        pictured = model.prompt(row['question'], load_image(row['image_path']))
        text = model.prompt(row['question'] + ' Answer in a few words.' * (k % 3), None)
        for ids, pixels in (pictured, text):
            greedy = model.generate([ids], [pixels] if pixels is not None else [], 3)[0]
            continuations = [option_ids(model.tokenizer, option)
                             for option in row['options'] + [LONG_OPTION]]
            continuations += [greedy[:1], greedy]
            items += [(ids, pixels, continuation) for continuation in continuations]
    return items


def _count_prompt_passes(model):
    """Record the prompts each prompt pass runs; a full-sequence pass fails."""
    passes = []
    prompt_pass = model.prompt_pass

    def counted(sequences, pixel_values):
        passes.append([tuple(s) for s in sequences])
        return prompt_pass(sequences, pixel_values)

    def refused(*args):
        raise AssertionError('a full sequence ran')

    model.prompt_pass, model.last_logits = counted, refused
    return passes


@pytest.mark.parametrize('kind', ['native', 'hf_llava'])
def test_shared_prompt_scores_equal_full_sequence_scores(finished, data_root, kind):
    """The trained tiny default, natively and as its transformers export: the
    options continuing from their prompt's cache score as their full
    sequences (within 1e-5, float32) with the same ``greedy``, each prompt
    runs once whatever the batch size, and predict() (the no-image control
    too) gives the same records."""
    _, manifests = finished
    final = manifests[2]['artifact']
    model = load_eval_model(final if kind == 'native' else osp.join(final, 'hf_llava'))
    assert model.prefix_cache == 'cache'  # transformers 5.25 names it so
    rows, problems = read_eval_rows(str(data_root / 'eval.jsonl'), str(data_root / 'images'))
    assert not problems
    items = _mixed_items(model, rows[:6])
    prompts = {(tuple(ids), id(pixels)) for ids, pixels, _ in items}
    assert len({len(ids) for ids, _ in prompts}) >= 3  # left padding differs
    assert len({len(c) for _, _, c in items}) >= 3
    full = score_continuations(model, items, 4, share_prompts=False)
    assert 0 < sum(greedy for _, greedy in full) < len(full)
    passes = _count_prompt_passes(model)
    for batch_size in (1, 8, 100):
        passes.clear()
        shared = score_continuations(model, items, batch_size)
        assert sorted(p for run in passes for p in run) == sorted(ids for ids, _ in prompts)
        assert len(passes) == (1 if batch_size == 100 else len(prompts))
        assert [greedy for _, greedy in shared] == [greedy for _, greedy in full]
        for (new, _), (old, _) in zip(shared, full):
            assert new == pytest.approx(old, abs=1e-5)
    del model.prompt_pass, model.last_logits

    records = [predict(model, rows[:12], batch_size=8, show_progress=False, with_images=images)
               for images in (True, False)]
    model.prefix_cache = None  # the full sequences, as before
    for images, new in zip((True, False), records):
        old = predict(model, rows[:12], batch_size=8, show_progress=False, with_images=images)
        assert [r['prediction'] for r in new] == [r['prediction'] for r in old]
        for a, b in zip(new, old):
            assert a['option_scores'] == pytest.approx(b['option_scores'], abs=1e-5)


def test_a_cache_that_cannot_be_reordered_falls_back_to_full_sequences(model_dirs, eval_data):
    model = load_eval_model(model_dirs['native'], 'cpu', pad_to_square=True)
    rows, _ = read_eval_rows(eval_data['eval'], eval_data['image_folder'])
    items = _mixed_items(model, rows[:2])
    full = score_continuations(model, items, 3, share_prompts=False)
    prompt_pass = model.prompt_pass

    def legacy(*args):  # a cache of the old tuple kind
        last, _, mask = prompt_pass(*args)
        return last, ((torch.zeros(1), torch.zeros(1)),), mask

    model.prompt_pass = legacy
    fallen_back = score_continuations(model, items, 3)
    assert model.prefix_cache is None  # the model's next batches go straight there
    assert [greedy for _, greedy in fallen_back] == [greedy for _, greedy in full]
    assert [logp for logp, _ in fallen_back] == pytest.approx([logp for logp, _ in full],
                                                              abs=1e-5)


def test_group_batches_never_split_a_group():
    groups = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9, 10], [11]]
    assert list(group_batches(groups, 4)) == [[[0, 1, 2], [3]], [[4, 5]],
                                              [[6, 7, 8, 9, 10]], [[11]]]
    assert list(group_batches(groups, 100)) == [groups]
    assert list(group_batches([], 3)) == []


def test_normalize_answer():
    assert normalize_answer('  The shape is RED. ') == 'the shape is red'
    assert normalize_answer('"Yes!"') == 'yes'
    assert normalize_answer('a, b') == 'a, b'  # inner punctuation stays
    assert normalize_answer(None) == ''


def test_metrics():
    preds = [dict(type='colour', correct=True, option_scores={'a': 0, 'b': 1}),
             dict(type='colour', correct=False, option_scores={'a': 0, 'b': 1, 'c': 2, 'd': 3}),
             dict(type='shape', correct=True, option_scores={'a': 0, 'b': 1, 'c': 2, 'd': 3}),
             dict(type=None, correct=False)]
    m = compute_metrics(preds)
    assert m['n'] == 4 and m['accuracy'] == 0.5
    assert m['chance'] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4) / 3)
    assert m['per_type'] == {'colour': dict(n=2, accuracy=0.5, chance=(1 / 2 + 1 / 4) / 2),
                             'shape': dict(n=1, accuracy=1.0, chance=0.25)}
    assert m['multiple_choice']['n'] == 3 and m['open'] == dict(n=1, accuracy=0.0)


# --------------------------------------------------------------------------- #
# Bad rows and unreadable data
# --------------------------------------------------------------------------- #

BAD_ROWS = [
    (dict(id='a', image='missing.png', question='q', answer='x'), 'missing_image'),
    (dict(id='b', answer='x'), 'missing_question'),
    (dict(id='c', question='q'), 'missing_answer'),
    (dict(id='d', question='q', answer='x', options=['y', 'z']), 'answer_not_in_options'),
    (dict(id='e', question='q', answer='x', options='x'), 'bad_options'),
    (dict(id='f', question='q', answer='x', type=3), 'bad_type'),
    (dict(id='g', question=['q'], answer='x'), 'missing_question'),
    (['not', 'an', 'object'], 'not_an_object'),
]


def _bad_file(tmp_path, good_row):
    path = tmp_path / 'bad.jsonl'
    lines = [json.dumps(good_row)] + [json.dumps(row) for row, _ in BAD_ROWS]
    lines += ['{"id": "h", not json', json.dumps(dict(good_row))]  # duplicate id too
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def test_bad_rows_are_reported_like_check_data(tmp_path, eval_data, model_dirs):
    good = json.loads(open(eval_data['eval']).readline())
    path = _bad_file(tmp_path, good)
    rows, problems = read_eval_rows(path, eval_data['image_folder'])
    assert [r['id'] for r in rows] == [good['id']]
    by_row = {p['row']: p for p in problems}
    for index, (_, reason) in enumerate(BAD_ROWS, start=1):
        assert by_row[index]['reason'] == reason
        assert set(by_row[index]) == {'file', 'row', 'id', 'reason', 'detail'}
    assert by_row[len(BAD_ROWS) + 1]['reason'] == 'invalid_json'
    assert by_row[len(BAD_ROWS) + 2]['reason'] == 'duplicate_id'

    out = tmp_path / 'out'
    with pytest.raises(BadRowsError, match='--skip-bad-rows') as err:
        evaluate(model_dirs['native'], path, eval_data['image_folder'], str(out))
    assert len(err.value.problems) == len(problems)
    written = [json.loads(line) for line in open(out / 'bad_rows.jsonl')]
    assert written == problems
    assert not (out / 'metrics.json').exists()

    metrics = evaluate(model_dirs['native'], path, eval_data['image_folder'], str(out),
                       skip_bad_rows=True, show_progress=False)
    assert metrics['n'] == 1 and metrics['skipped_rows'] == len(problems)


def test_unreadable_data_is_a_clear_error(tmp_path):
    with pytest.raises(EvalDataError, match='cannot read evaluation data'):
        read_eval_rows(str(tmp_path / 'nope.jsonl'))
    broken = tmp_path / 'broken.json'
    broken.write_text('{"not": "a list"}')
    with pytest.raises(EvalDataError, match='holds a list of rows'):
        read_eval_rows(str(broken))


def test_cli(tmp_path, eval_data, model_dirs):
    out = tmp_path / 'out'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    tool = osp.join(REPO, 'tools', 'eval.py')
    result = subprocess.run(
        [sys.executable, tool, model_dirs['native'], '--data', eval_data['eval'],
         '--image-folder', eval_data['image_folder'], '--out', str(out), '--batch-size', '5'],
        capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['n'] == 12 and set(metrics['per_type']) == {'colour', 'shape', 'position'}
    assert metrics['chance'] == pytest.approx(1 / EVAL_OPTIONS)
    assert metrics['model_format'] == 'native'
    predictions = [json.loads(line) for line in open(out / 'predictions.jsonl')]
    assert len(predictions) == 12
    assert {'id', 'prediction', 'correct', 'option_scores'} <= set(predictions[0])
    assert 'all' in result.stdout and 'accuracy' in result.stdout

    result = subprocess.run([sys.executable, tool, model_dirs['native'], '--data',
                             str(tmp_path / 'missing.jsonl'), '--out', str(out)],
                            capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 1
    assert 'eval error: cannot read evaluation data' in result.stderr
    assert 'Traceback' not in result.stderr


# --------------------------------------------------------------------------- #
# The pipeline's eval stage
# --------------------------------------------------------------------------- #

def test_tiny_default_ends_with_its_accuracy(finished):
    work_dir, manifests = finished
    assert [m['stage'] for m in manifests] == ['proxy', 'align', 'finetune', 'eval']
    manifest = manifests[-1]
    metrics = manifest['metrics']
    assert metrics['n'] == 48 and metrics['chance'] == pytest.approx(0.25)
    assert set(metrics['per_type']) == {'colour', 'shape', 'position'}
    with open(osp.join(manifest['artifact'], 'metrics.json')) as f:
        assert json.load(f)['accuracy'] == metrics['accuracy']
    assert manifest['made_from']['model'] == manifests[2]['artifact']
    last = format_summary(manifests).splitlines()[-1]
    # The no-image control: the same questions without their pictures.
    no_image = metrics['no_image']
    assert no_image['n'] == 48 and set(no_image['per_type']) == {'colour', 'shape', 'position'}
    assert last.strip() == (f"final model accuracy {metrics['accuracy']:.1%} (chance 25.0%); "
                            f"without the pictures {no_image['accuracy']:.1%}")


def test_eval_stage_reruns_only_for_a_new_final_model(finished, data_root, tmp_path):
    work_dir, _ = finished
    for stage in ('proxy', 'align', 'finetune', 'eval'):
        shutil.copytree(osp.join(work_dir, stage), tmp_path / stage)
    cfg = tiny_config(tmp_path, data_root)
    assert run_pipeline(cfg)[-1]['skipped']
    manifest_path = tmp_path / 'finetune' / 'manifest.json'
    manifest = json.loads(manifest_path.read_text())
    manifest['finished_at'] = '2999-01-01 00:00:00'  # as if finetune was trained again
    manifest_path.write_text(json.dumps(manifest))
    again = run_pipeline(tiny_config(tmp_path, data_root))[-1]
    assert not again['skipped'] and again['model_finished_at'] == '2999-01-01 00:00:00'


@pytest.mark.parametrize('overrides, message', [
    ({'eval': None}, 'has no `eval = dict('),
    ({'eval.data': '/no/such.jsonl'}, "eval.data: '/no/such.jsonl' does not exist"),
    ({'eval.batch_size': 0}, 'eval.batch_size must be a positive integer'),
    ({'eval.typo': 1}, "eval: unknown key(s) ['typo']"),
    ({'stages': ['finetune', 'eval', 'align']}, 'out of order'),
])
def test_eval_config_errors(tmp_path, data_root, overrides, message):
    cfg = tiny_config(tmp_path, data_root, **overrides)
    with pytest.raises(ConfigError) as err:
        check_eval_config(cfg, selected_stages(cfg))
    assert message in str(err.value)


def test_eval_stage_alone_needs_the_final_model(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, stages=['eval'])
    with pytest.raises(ConfigError, match="scores the final model of stage 'finetune'"):
        run_pipeline(cfg)


# --------------------------------------------------------------------------- #
# lmms-eval bridge: its files (the run itself: tests/test_lmms_eval.py)
# --------------------------------------------------------------------------- #

def test_local_lmms_eval_tasks_get_their_rows(tmp_path, eval_data):
    rows, _ = read_eval_rows(eval_data['mixed'], eval_data['image_folder'])
    include = write_local_tasks(['dpa_synthetic', 'dpa_synthetic_mc'], rows, str(tmp_path))
    written = {}
    for task in ('dpa_synthetic', 'dpa_synthetic_mc'):
        yaml_text = open(osp.join(include, task, f'{task}.yaml')).read()
        data = osp.join(str(tmp_path), f'{task}.jsonl')
        assert f'data_files: "{data}"' in yaml_text and '__DATA_FILES__' not in yaml_text
        assert sorted(os.listdir(osp.join(include, task))) == [f'{task}.yaml', 'utils.py']
        written[task] = [json.loads(line) for line in open(data)]
    # Open questions to the generation task, multiple choice to the loglikelihood one.
    assert [w['id'] for w in written['dpa_synthetic']] == ['open_0', 'open_1', 'text_0']
    assert [w['id'] for w in written['dpa_synthetic_mc']] == [r['id'] for r in rows[:12]]
    assert all(w['image'] is None or osp.isabs(w['image'])
               for task_rows in written.values() for w in task_rows)
    sys.path.insert(0, osp.join(include, 'dpa_synthetic'))
    try:
        import utils as task_utils
        first = written['dpa_synthetic_mc'][0]
        assert task_utils.doc_to_visual(first)[0].size == (32, 32)
        assert first['options'][task_utils.doc_to_target(first)] == first['answer']
        open_row = written['dpa_synthetic'][0]
        assert task_utils.process_results(open_row, [' ' + open_row['answer'].upper()]) == \
            {'exact_match': 1.0}
    finally:
        sys.path.pop(0)
        sys.modules.pop('utils', None)
    only_choice = [r for r in rows if r['options'] is not None]
    with pytest.raises(LmmsEvalError, match='dpa_synthetic scores the open rows and the data has '
                       'none; dpa_synthetic_mc scores the others'):
        write_local_tasks(['dpa_synthetic'], only_choice, str(tmp_path / 'again'))


def test_lmms_eval_results_are_read_without_filter_suffix(tmp_path):
    # The layout lmms-eval 0.7 writes: <output>/<model>/<time>_results.json.
    folder = tmp_path / 'out' / 'model'
    folder.mkdir(parents=True)
    (folder / '20261125_results.json').write_text(json.dumps({'results': {'dpa_synthetic': {
        'alias': 'dpa_synthetic', 'exact_match,none': 0.25, 'exact_match_stderr,none': 0.1}}}))
    assert read_results(str(tmp_path / 'out'), ['dpa_synthetic']) == {
        'dpa_synthetic': {'exact_match': 0.25, 'exact_match_stderr': 0.1}}
    # A task that was asked for and has no results fails the run.
    with pytest.raises(LmmsEvalError, match=r"no results for \['mme'\]"):
        read_results(str(tmp_path / 'out'), ['dpa_synthetic', 'mme'])
    with pytest.raises(LmmsEvalError, match='wrote 0 results files'):
        read_results(str(tmp_path / 'empty'), ['dpa_synthetic'])


# What lmms-eval 0.7.3 logged (colours kept) when it exited 0 without results.
FAILED_LOG = (
    '\x1b[32m2026-12-04 03:26:40\x1b[0m | \x1b[1mINFO    \x1b[0m | lmms_eval.__main__:'
    'cli_evaluate:516 - Verbosity set to INFO\n'
    'Postprocessing:   0%|          | 0/48 [00:00<?, ?it/s]Traceback (most recent call last):\n'
    '  File "lmms_eval/api/task.py", line 1606, in process_results\n'
    '    lls, is_greedy = zip(*results)\n'
    'ValueError: too many values to unpack (expected 2)\n'
    '\x1b[32m2026-12-04 03:23:51\x1b[0m | \x1b[31m\x1b[1mERROR   \x1b[0m | lmms_eval.__main__:'
    'cli_evaluate:614 - Error during evaluation: RetryError\n')


def test_lmms_eval_failures_are_read_from_its_log():
    errors = log_errors(FAILED_LOG)
    assert errors[0] == 'ValueError: too many values to unpack (expected 2)'
    assert 'Error during evaluation: RetryError' in errors[1] and len(errors) == 2
    assert log_errors('2026-12-04 | INFO     | lmms_eval: Running generate_until requests\n'
                      '2026-12-04 | WARNING  | lmms_eval: a warning\n') == []


def test_lmms_eval_model_choice(model_dirs, tmp_path):
    native, hf = model_dirs['native'], model_dirs['hf']
    assert choose_model(native) == ('llava_hf', hf)
    assert choose_model(hf, 'llava_hf') == ('llava_hf', hf)
    assert choose_model(native, 'dpa') == ('dpa', native)
    without_export = tmp_path / 'native'
    shutil.copytree(native, without_export, ignore=shutil.ignore_patterns('hf_llava'))
    assert choose_model(str(without_export)) == ('dpa', str(without_export))
    with pytest.raises(LmmsEvalError, match='--lmms-eval-model dpa'):
        choose_model(str(without_export), 'llava_hf')


def test_agreement_compares_each_row(eval_data):
    rows, _ = read_eval_rows(eval_data['mixed'], eval_data['image_folder'])
    choice = [r for r in rows if r['options'] is not None][:2]
    open_rows = [r for r in rows if r['options'] is None][:2]
    predictions = {str(r['id']): dict(prediction=r['options'][1], option_scores={
        option: -float(i) for i, option in enumerate(r['options'])}) for r in choice}
    predictions.update({'open_0': dict(prediction='a red shape'), 'open_1': dict(prediction='x')})
    # lmms-eval's records: losses (logged as strings) and generated text.
    losses = [[[str(float(i)), 'False']] for i in (1, 0, 2, 3)]
    samples = [dict(doc_id=0, filtered_resps=losses), dict(doc_id=1, filtered_resps=losses)]
    record = agreement('dpa_synthetic_mc', samples, choice, predictions)
    assert record['agree'] == 2 and record['rate'] == 1.0
    assert record['max_score_difference'] == pytest.approx(1.0)  # option 0: -loss -1, score 0
    samples = [dict(doc_id=0, filtered_resps=['a red shape ']), dict(doc_id=1, filtered_resps='y')]
    record = agreement('dpa_synthetic', samples, open_rows, predictions)
    assert (record['agree'], record['differing_ids']) == (1, ['open_1'])
    with pytest.raises(LmmsEvalError, match='not the 2 rows'):
        agreement('dpa_synthetic', samples[:1], open_rows, predictions)


def test_the_no_image_control_asks_the_pictured_rows_without_their_pictures(
        finished, eval_data, tmp_path, monkeypatch):
    """The rows that show a picture are asked again with none (the text-only
    row once only), reported beside the real accuracy; off on request."""
    from dpa.evaluation.evaluator import NO_IMAGE_PREDICTIONS_FILE, format_table
    from dpa.evaluation.models import NativeEvalModel
    asked = []
    prompt = NativeEvalModel.prompt
    monkeypatch.setattr(NativeEvalModel, 'prompt',
                        lambda self, question, image: asked.append(image is None)
                        or prompt(self, question, image))
    out = tmp_path / 'out'
    metrics = evaluate(str(finished[0]), eval_data['mixed'], eval_data['image_folder'], str(out),
                       batch_size=16, show_progress=False)
    pictured = 14  # 12 multiple-choice rows and two open questions with a picture
    assert asked.count(False) == pictured and asked.count(True) == pictured + 1
    control = metrics['no_image']
    assert control['n'] == pictured and set(control['per_type']) == {
        'colour', 'shape', 'position', 'open'}
    with open(out / NO_IMAGE_PREDICTIONS_FILE) as f:
        assert [json.loads(line)['id'] for line in f] == [
            r['id'] for r in read_eval_rows(eval_data['mixed'], eval_data['image_folder'])[0]
            if r['image_path'] is not None]
    header, *rows = format_table(metrics).splitlines()
    assert header.split()[-2:] == ['no', 'image']
    assert rows[-1].split()[-1] == f"{control['accuracy']:.1%}"

    again = evaluate(str(finished[0]), eval_data['mixed'], eval_data['image_folder'], str(out),
                     batch_size=16, show_progress=False, no_image_control=False)
    assert 'no_image' not in again and not (out / NO_IMAGE_PREDICTIONS_FILE).exists()
    assert 'no image' not in format_table(again)
