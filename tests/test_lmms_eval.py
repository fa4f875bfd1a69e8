"""lmms-eval on the hf_llava export, through the local dpa_synthetic task.

lmms-eval is not a dependency of the project: it lives in its own environment
(requirements/eval.txt, README "Evaluate"). This test runs when the python in
``LMMS_EVAL_PYTHON`` (default: this one) imports ``lmms_eval``, and skips
otherwise. It checks that lmms-eval's answers are the built-in evaluator's:
the same prompt, greedy decoding and end-of-turn stop.
"""
import json
import os
import subprocess
import sys

import pytest
from mmengine.config import Config

import dpa  # noqa: F401
from dpa.datasets.synthetic import make_synthetic_data
from dpa.evaluation import load_eval_model, normalize_answer, predict, read_eval_rows
from dpa.evaluation.lmms_eval import PYTHON_ENV, run_lmms_eval
from dpa.models.builders import PROCESSORS
from dpa.models.export import export_llava
from dpa.models.mllm import LlavaDPAModel

from tiny import REPO

PYTHON = os.environ.get(PYTHON_ENV) or sys.executable


def _importable() -> bool:
    probe = subprocess.run([PYTHON, '-c', 'import lmms_eval'], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _importable(),
                                reason=f'lmms_eval is not importable by {PYTHON} '
                                f'(set {PYTHON_ENV} to its environment\'s python)')


def test_lmms_eval_answers_like_the_builtin_evaluator(tmp_path):
    models = os.path.join(REPO, 'configs', '_base_', 'models')
    qwen2 = Config.fromfile(os.path.join(models, 'tiny_qwen2.py'))
    clip = Config.fromfile(os.path.join(models, 'tiny_clip.py'))
    model = LlavaDPAModel(llm=qwen2.llm.to_dict(), tokenizer=dict(type='TinyTokenizer'),
                          vision_tower=clip.vision_tower.to_dict(),
                          trainable=['llm', 'projector']).eval()
    tokenizer = PROCESSORS.build(dict(type='TinyTokenizer'))
    export = str(tmp_path / 'hf_llava')
    export_llava(model, tokenizer, PROCESSORS.build(clip.image_processor.to_dict()), export)

    paths = make_synthetic_data(tmp_path / 'data', num_captions=2, num_instructions=2,
                                num_eval=4, image_size=32)
    rows, _ = read_eval_rows(paths['eval'], paths['image_folder'])
    # Generation tasks only (lmms-eval's loglikelihood path fails on transformers 5):
    # the rows as open questions, one answer set to what the model says.
    rows = [dict(r, options=None) for r in rows]
    ours = predict(load_eval_model(export, 'cpu'), rows, show_progress=False)
    rows[0]['answer'] = ours[0]['prediction'] or 'empty'
    expected = sum(normalize_answer(r['answer']) == normalize_answer(p['prediction'])
                   for r, p in zip(rows, ours)) / len(rows)
    assert expected > 0, 'the model generated nothing: the comparison would be blind'

    recorded = run_lmms_eval(export, ['dpa_synthetic'], rows, str(tmp_path / 'out'), PYTHON)
    assert recorded['tasks'] == ['dpa_synthetic']
    score = recorded['results']['dpa_synthetic']['exact_match']
    assert score == pytest.approx(expected)
    json.dumps(recorded)  # what metrics.json records is plain json
