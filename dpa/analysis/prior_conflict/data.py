"""The benchmark's data: 32-pixel pictures of one coloured shape, alignment
captions in style B, style-A instruction rows, a held-out multiple-choice
split and its no-image control (the same questions on a blank picture).

``wording='words'`` asks and answers in the toy prior's word-level language
("what colour is the shape ?" -> "red ."); ``wording='natural'`` in English
("What colour is the shape?" -> "The shape is red.", the options whole
answers), for a real pretrained LLM."""
import functools
import json
import os
import os.path as osp
import random
import shutil

from PIL import Image

from dpa.analysis.prior_conflict.language import (ATTRIBUTES, NATURAL_QUESTIONS, QUESTIONS,
                                                  natural_answer, qa_turns, random_scene,
                                                  style_b_caption)
from dpa.datasets.synthetic import draw_scene

IMAGE_TOKEN = '<image>'
DEFAULTS = dict(num_captions=1500, num_instructions=2000, num_eval=300, image_size=32,
                jitter=0.06, seed=0, wording='words')
WORDINGS = ('words', 'natural')
# Bump when the generator changes so cached data is regenerated.
FORMAT_VERSION = 1


def _picture(rng, scene, size, jitter):
    shape = dict(scene, size='large',
                 offset=(rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)))
    return draw_scene(dict(bg='white', shapes=[shape]), size)


def _rows(rng, count, prefix, image_dir, size, jitter, make_row):
    rows = []
    for i in range(count):
        scene = random_scene(rng)
        name = f'{prefix}_{i:05d}.png'
        _picture(rng, scene, size, jitter).save(osp.join(image_dir, name))
        rows.extend(make_row(rng, scene, name, i))
    return rows


def _caption_row(rng, scene, name, i):
    return [dict(id=f'caption_{i}', image=name, conversations=[
        {'from': 'human', 'value': IMAGE_TOKEN + '\nDescribe the image briefly.'},
        {'from': 'gpt', 'value': style_b_caption(scene)}])]


def _instruction_row(rng, scene, name, i, wording):
    turns = qa_turns(rng, scene, rng.randint(1, 3))
    conversations = []
    for k, (attribute, question, answer) in enumerate(turns):
        if wording == 'natural':
            question, answer = NATURAL_QUESTIONS[attribute], natural_answer(attribute, scene)
        value = f'{IMAGE_TOKEN}\n{question}' if k == 0 else question
        conversations += [{'from': 'human', 'value': value}, {'from': 'gpt', 'value': answer}]
    return [dict(id=f'instruction_{i}', image=name, conversations=conversations)]


def _eval_rows(rng, scene, name, i, wording):
    rows = []
    for attribute, values in ATTRIBUTES.items():
        if wording == 'natural':
            options = [natural_answer(attribute, dict(scene, **{attribute: v})) for v in values]
            row = dict(question=NATURAL_QUESTIONS[attribute],
                       answer=natural_answer(attribute, scene), options=options)
        else:
            row = dict(question=QUESTIONS[attribute], answer=scene[attribute],
                       options=list(values))
        rows.append(dict(id=f'eval_{i}_{attribute}', image=name, type=attribute, **row))
    return rows


def data_settings(**params) -> dict:
    """Every setting the data of ``params`` is made with (the defaults
    filled in, the generator's version): what ``params.json`` records."""
    return dict(DEFAULTS, **params, version=FORMAT_VERSION)


def make_benchmark_data(root: str, **params) -> dict:
    """Generate (once, deterministically) the data under ``root``; return the
    paths: ``image_folder``, ``captions``, ``instructions``, ``eval``,
    ``eval_no_image``."""
    params = data_settings(**params)
    if params['wording'] not in WORDINGS:
        raise ValueError(f"wording={params['wording']!r}: choose one of {WORDINGS}")
    root = osp.abspath(root)
    paths = dict(image_folder=osp.join(root, 'images'),
                 captions=osp.join(root, 'captions.jsonl'),
                 instructions=osp.join(root, 'instructions.jsonl'),
                 eval=osp.join(root, 'eval.jsonl'),
                 eval_no_image=osp.join(root, 'eval_no_image.jsonl'))
    marker = osp.join(root, 'params.json')
    if osp.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return paths
    tmp = f'{root}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    image_dir = osp.join(tmp, 'images')
    os.makedirs(image_dir)
    rng = random.Random(params['seed'])
    size, jitter, wording = params['image_size'], params['jitter'], params['wording']
    splits = dict(
        captions=_rows(rng, params['num_captions'], 'caption', image_dir, size, jitter,
                       _caption_row),
        instructions=_rows(rng, params['num_instructions'], 'instruction', image_dir, size,
                           jitter, functools.partial(_instruction_row, wording=wording)),
        eval=_rows(rng, params['num_eval'], 'eval', image_dir, size, jitter,
                   functools.partial(_eval_rows, wording=wording)))
    Image.new('RGB', (size, size), 'white').save(osp.join(image_dir, 'blank.png'))
    splits['eval_no_image'] = [dict(row, image='blank.png') for row in splits['eval']]
    for split, rows in splits.items():
        with open(osp.join(tmp, osp.basename(paths[split])), 'w') as f:
            f.writelines(json.dumps(row) + '\n' for row in rows)
    with open(osp.join(tmp, 'params.json'), 'w') as f:
        json.dump(params, f)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return paths
