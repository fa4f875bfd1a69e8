"""lmms-eval through the bridge (tools/eval.py --lmms-eval): lmms-eval's
``llava_hf`` on the export and the project's ``dpa`` model on native models
(the tiny default, an InternLM2 + AnyRes model with no export), generation
and multiple choice, each row's answer compared with the built-in evaluator's;
and failed lmms-eval runs reported as failures, with no score.

lmms-eval is not a dependency of the project: it lives in its own environment
(docs/evaluate.md), whose python ``LMMS_EVAL_PYTHON`` names. With it set,
these tests fail when that python cannot run lmms-eval (CI sets it); without
it, they run when this python imports ``lmms_eval`` and skip otherwise.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.config import Config
from PIL import Image

import dpa  # noqa: F401
from dpa.datasets.synthetic import make_synthetic_data
from dpa.engine.standin import make_tiny
from dpa.evaluation.lmms_eval import PYTHON_ENV
from dpa.models.builders import PROCESSORS
from dpa.models.export import save_native
from dpa.models.mllm import LlavaDPAModel

from tiny import REPO

PYTHON = os.environ.get(PYTHON_ENV) or sys.executable
TOOL = osp.join(REPO, 'tools', 'eval.py')
ANYRES = dict(grid_shapes=[[1, 2], [2, 1], [2, 2]])


@pytest.fixture(scope='module')
def lmms_python():
    probe = subprocess.run([PYTHON, '-c', 'import lmms_eval'], capture_output=True, text=True)
    if probe.returncode != 0:
        message = f'lmms_eval is not importable by {PYTHON}: {probe.stderr.strip()[-300:]}'
        if os.environ.get(PYTHON_ENV):  # asked for: a missing lmms-eval is a failure
            pytest.fail(message)
        pytest.skip(message + f' (set {PYTHON_ENV} to its environment\'s python)')
    return PYTHON


def mixed_rows(eval_file, out_file, extra=(), limit=None):
    """The first ``limit`` multiple-choice rows of ``eval_file`` (and
    ``extra``) and the same questions as open ones."""
    rows = [json.loads(line) for line in open(eval_file)][:limit] + list(extra)
    open_rows = [{k: v for k, v in r.items() if k != 'options'} for r in rows]
    for row in open_rows:
        row['id'] = f"{row['id']}_open"
    with open(out_file, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows + open_rows)
    return str(out_file)


def run_eval(model, data, images, out, *options):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, TOOL, str(model), '--data', data, '--image-folder',
                           images, '--out', str(out), *options],
                          capture_output=True, text=True, cwd=REPO, env=env)


def check_agreement(result, out, tasks):
    """Every row answered as the built-in evaluator answered it, and the
    scores equal the built-in evaluator's on the same rows."""
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / 'metrics.json').read_text())
    lmms = metrics['lmms_eval']
    builtin = dict(dpa_synthetic=('exact_match', metrics['open']),
                   dpa_synthetic_mc=('acc', metrics['multiple_choice']))
    for task in tasks:
        assert lmms['agreement'][task]['rate'] == 1.0, lmms['agreement'][task]
        assert lmms['agreement'][task]['rows'] == builtin[task][1]['n']
        metric, ours = builtin[task]
        assert lmms['results'][task][metric] == pytest.approx(ours['accuracy'])
        # This run's own samples: a fresh directory, lmms-eval's per-row answers kept.
        assert osp.dirname(lmms['dir']) == str(out / 'lmms_eval')
        assert any(name.endswith(f'_samples_{task}.jsonl')
                   for _, _, names in os.walk(lmms['dir']) for name in names)
    if 'dpa_synthetic_mc' in tasks:  # the same option scores, not only the same choices
        assert lmms['agreement']['dpa_synthetic_mc']['max_score_difference'] < 1e-4
    return lmms


@pytest.fixture(scope='module')
def tiny_default(finished, data_root, tmp_path_factory):
    work_dir, _ = finished
    # 16 of the 48 questions keep the test short; docs/evaluate.md shows all 48.
    data = mixed_rows(data_root / 'eval.jsonl', tmp_path_factory.mktemp('rows') / 'mixed.jsonl',
                      limit=16)
    return work_dir, data, str(data_root / 'images')


def test_llava_hf_scores_the_export_like_the_builtin_evaluator(lmms_python, tiny_default,
                                                               tmp_path):
    work_dir, data, images = tiny_default
    out = tmp_path / 'out'
    result = run_eval(work_dir, data, images, out, '--lmms-eval', 'dpa_synthetic',
                      '--lmms-eval-python', lmms_python)
    lmms = check_agreement(result, out, ['dpa_synthetic'])
    assert lmms['model'] == 'llava_hf' and lmms['pretrained'].endswith('hf_llava')
    assert 'lmms-eval model llava_hf' in result.stdout
    assert "answers equal to the built-in evaluator's: 16/16 rows (100.0%)" in result.stdout


def test_dpa_model_scores_the_native_model_generation_and_multiple_choice(
        lmms_python, tiny_default, tmp_path):
    work_dir, data, images = tiny_default
    out = tmp_path / 'out'
    result = run_eval(work_dir, data, images, out, '--lmms-eval',
                      'dpa_synthetic,dpa_synthetic_mc', '--lmms-eval-model', 'dpa',
                      '--lmms-eval-python', lmms_python, '--batch-size', '3')
    lmms = check_agreement(result, out, ['dpa_synthetic', 'dpa_synthetic_mc'])
    assert lmms['model'] == 'dpa'
    assert lmms['pretrained'].endswith(osp.join('finetune', 'artifact'))


def test_dpa_model_scores_a_model_without_export(lmms_python, tmp_path):
    """InternLM2 (the project's implementation) with AnyRes tiles: no
    transformers export; ``auto`` takes the project's model."""
    tiny = make_tiny(Config.fromfile(osp.join(REPO, 'configs', 'dpa_internlm7b.py')),
                     cpu_only=True)
    model = LlavaDPAModel(llm=tiny.llm.to_dict(), tokenizer=tiny.tokenizer.to_dict(),
                          vision_tower=tiny.vision_tower.to_dict(), anyres=ANYRES).eval()
    native = tmp_path / 'native'
    save_native(model, PROCESSORS.build(tiny.tokenizer.to_dict()),
                PROCESSORS.build(tiny.image_processor.to_dict()), str(native))
    paths = make_synthetic_data(tmp_path / 'data', num_captions=2, num_instructions=2,
                                num_eval=6, image_size=32)
    Image.new('RGB', (64, 24), 'red').save(osp.join(paths['image_folder'], 'wide.png'))
    wide = dict(id='wide', image='wide.png', question='What colour is the shape?',
                answer='red', options=['red', 'blue'], type='colour')
    data = mixed_rows(paths['eval'], tmp_path / 'mixed.jsonl', [wide])
    out = tmp_path / 'out'
    result = run_eval(native, data, paths['image_folder'], out, '--lmms-eval',
                      'dpa_synthetic,dpa_synthetic_mc', '--lmms-eval-python', lmms_python)
    lmms = check_agreement(result, out, ['dpa_synthetic', 'dpa_synthetic_mc'])
    assert lmms['model'] == 'dpa' and 'lmms-eval model dpa' in result.stdout


def test_failed_lmms_eval_runs_print_no_score(lmms_python, tiny_default, tmp_path):
    work_dir, data, images = tiny_default
    out = tmp_path / 'out'
    # llava_hf's loglikelihood path fails inside lmms-eval 0.7.3, which exits 0.
    result = run_eval(work_dir, data, images, out, '--lmms-eval', 'dpa_synthetic_mc',
                      '--lmms-eval-python', lmms_python)
    assert result.returncode == 1
    assert 'eval error: lmms-eval failed (exit status 0' in result.stderr
    assert '--lmms-eval-model dpa' in result.stderr  # the way out
    assert 'lmms-eval' not in result.stdout and 'accuracy' not in result.stdout
    # An unknown task, into a folder that holds an earlier run's results:
    # nothing is read from it, nothing recorded.
    earlier = out / 'lmms_eval' / 'earlier' / 'output' / 'model'
    earlier.mkdir(parents=True)
    (earlier / '20261125_results.json').write_text(json.dumps(
        {'results': {'no_such_task': {'exact_match,none': 0.5}}}))
    result = run_eval(work_dir, data, images, out, '--lmms-eval', 'no_such_task',
                      '--lmms-eval-python', lmms_python)
    assert result.returncode == 1
    assert 'Tasks not found: no_such_task' in result.stderr and result.stdout == ''
    assert 'lmms_eval' not in json.loads((out / 'metrics.json').read_text())
    assert len(os.listdir(out / 'lmms_eval')) == 3  # one fresh directory per run


# Run with the lmms-eval python: requests as lmms-eval builds them, without a task.
REQUESTS_SCRIPT = '''
import json, sys
from lmms_eval.api.instance import Instance
from dpa.evaluation.lmms_eval_model import DPALmmsModel

model = DPALmmsModel(pretrained=sys.argv[1], device='cpu', batch_size=2)
model.task_dict = {'t': {'test': [{}]}}
no_image = lambda doc: []


def generate(context, **gen_kwargs):
    request = Instance('generate_until', (context, gen_kwargs, no_image, 0, 't', 'test'), 0,
                       metadata=dict(task='t', doc_id=0, repeats=1))
    return model.generate_until([request])[0]


full = generate('Describe it.', max_new_tokens=12, until=[])
out = dict(full=full, placeholder=generate('<image>\\nDescribe it.', max_new_tokens=12),
           cut=generate('Describe it.', max_new_tokens=12, until=[full[3:6], '']))
try:
    generate('Describe it.', temperature=0.7)
except ValueError as err:
    out['sampling'] = str(err)
print(json.dumps(out))
'''


def test_dpa_model_generation_options(lmms_python, finished):
    work_dir, _ = finished
    result = subprocess.run([lmms_python, '-c', REQUESTS_SCRIPT, str(work_dir)],
                            capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(out['full']) > 6, 'too short an answer to cut: the test would be blind'
    # A task's own <image> placeholder is dropped (no image here): the same prompt.
    assert out['placeholder'] == out['full']
    # Cut at the first stop string, as lmms-eval's models do; empty ones ignored.
    assert out['cut'] == out['full'].split(out['full'][3:6])[0]
    assert 'decodes greedily' in out['sampling']
