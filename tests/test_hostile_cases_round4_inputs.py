"""Hostile cases of round four (issue 30) on the inputs around the model: the
pictures lmms-eval is handed (case 9), damaged GGUF files and caches (case
14). One row each, in the style of ``test_hostile_cases.py``: what a user
did, the exit code and the words the message must hold, or what must hold.
"""
import importlib.util
import json
import os
import os.path as osp
import shutil

import numpy as np
import pytest
from PIL import Image

import dpa  # noqa: F401
from dpa.evaluation.lmms_eval import disagreement_warnings, write_local_tasks
from dpa.evaluation.models import load_image
from dpa.models import converted_cache, gguf
from test_hostile_cases import Case, Outcome, Run, play
from tiny import REPO, TINY

pytestmark = pytest.mark.usefixtures('one_thread')
TASK_UTILS = osp.join(REPO, 'dpa', 'evaluation', 'lmms_eval_tasks', 'dpa_synthetic', 'utils.py')


def _task_utils():
    spec = importlib.util.spec_from_file_location('dpa_synthetic_utils', TASK_UTILS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sixteen_bit_picture_for_lmms_eval(run):
    """A 16-bit grey PNG in the eval data: lmms-eval's task must see the
    picture the built-in evaluator sees, not a white square."""
    grey = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    path = str(run.tmp / 'deep.png')
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith('I')
    rows = [dict(id='deep', image_path=path, question='What colour is the shape?',
                 answer='The shape is red.', options=['The shape is red.', 'The shape is blue.'],
                 type='colour')]
    write_local_tasks(['dpa_synthetic_mc'], rows, str(run.tmp / 'lmms'))
    with open(run.tmp / 'lmms' / 'dpa_synthetic_mc.jsonl') as f:
        doc = json.loads(f.readline())
    seen = np.asarray(_task_utils().doc_to_visual(doc)[0])
    run.seen, run.expected = seen, np.asarray(load_image(path))
    return Outcome(0, '')


def lmms_eval_disagrees(run):
    record = dict(agreement=dict(dpa_synthetic_mc=dict(rows=5, agree=4, rate=0.8,
                                                       differing_ids=['eval_3'])))
    return Outcome(0, '\n'.join(disagreement_warnings(record)))


def train_on_a_gguf(run, content: bytes):
    path = str(run.tmp / 'model.gguf')
    with open(path, 'wb') as f:
        f.write(content)
    return run.train('--stage', 'proxy', options=[f'llm.pretrained={path}', 'llm.config=None'])


def converted_folder_damaged(run, damage):
    """A converted checkpoint folder (as the GGUF and ONNX caches write them)
    whose files no longer match their record."""
    source = str(run.tmp / 'source.bin')
    with open(source, 'wb') as f:
        f.write(b'weights')

    def convert(_, staging):
        with open(osp.join(staging, 'config.json'), 'w') as f:
            f.write('{}')
        return {}

    root = str(run.tmp / 'cache')
    folder = converted_cache.converted_checkpoint(source, root, convert, 'checkpoint', 'X')
    damage(folder)
    try:
        converted_cache.converted_checkpoint(source, root, convert, 'checkpoint', 'X')
    except converted_cache.ConversionError as err:
        return Outcome(1, str(err))
    return Outcome(0, '')


def unwritable_gguf_cache(run):
    source = str(run.tmp / 'model.gguf')
    with open(source, 'wb') as f:
        f.write(b'GGUF')
    blocker = str(run.tmp / 'a_file')
    open(blocker, 'w').close()
    run.monkeypatch.setenv(gguf.CACHE_ENV, osp.join(blocker, 'cache'))
    try:
        converted_cache.converted_checkpoint(source, gguf.gguf_cache_root(),
                                             lambda *_: {}, 'GGUF checkpoint', gguf.CACHE_ENV)
    except converted_cache.ConversionError as err:
        return Outcome(1, str(err))
    return Outcome(0, '')


def _flip_config(folder):
    with open(osp.join(folder, 'config.json'), 'a') as f:
        f.write(' ')


CASES = [
    Case('9 a 16-bit PNG reaches lmms-eval as the evaluator reads it',
         sixteen_bit_picture_for_lmms_eval, code=0,
         then=lambda r: r.seen.shape == r.expected.shape and (r.seen == r.expected).all()
         and r.seen.min() < 100),
    Case('9 lmms-eval answering otherwise is a console warning', lmms_eval_disagrees, code=0,
         says=['warning: lmms-eval dpa_synthetic_mc answered 1 of 5 rows otherwise', 'eval_3']),
    Case('14 a file that is not GGUF, before any model loads',
         lambda r: train_on_a_gguf(r, b'not a model at all'),
         says=['is not a GGUF file'], then=lambda r: not r.exists('proxy')),
    Case('14 a truncated GGUF file, before any model loads',
         lambda r: train_on_a_gguf(r, b'GGUF' + b'\x03\x00\x00\x00' + b'\x00' * 7),
         says=['cannot read the GGUF file', 'truncated or damaged'],
         then=lambda r: not r.exists('proxy')),
    Case('14 a damaged converted cache names the folder to delete',
         lambda r: converted_folder_damaged(r, _flip_config),
         says=['is damaged (config.json differ', 'delete the folder']),
    Case('14 a converted cache without its record is not trusted',
         lambda r: converted_folder_damaged(
             r, lambda folder: os.remove(osp.join(folder, converted_cache.RECORD))),
         says=['not a complete converted checkpoint', 'delete the folder']),
    Case('14 a converted cache with a file added is not trusted',
         lambda r: converted_folder_damaged(
             r, lambda folder: shutil.copy(osp.join(folder, 'config.json'),
                                           osp.join(folder, 'extra.json'))),
         says=['extra.json differ']),
    Case('14 an unwritable GGUF cache names the variable',
         unwritable_gguf_cache, says=['cannot write the converted GGUF checkpoint',
                                      f'set {gguf.CACHE_ENV} to a writable folder']),
]


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_hostile_case(case, tmp_path, data_root, finished, monkeypatch):
    outcome = play(case, Run(tmp_path, data_root, finished, monkeypatch))
    assert 'Traceback' not in outcome.text, outcome.text[-3000:]
