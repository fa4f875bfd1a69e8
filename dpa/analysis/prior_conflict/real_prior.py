"""A real pretrained LLM as the benchmark's prior (``--llm smollm2``): no
pre-training, but the same two questions the toy prior's gates ask, put to
the real one before anything trains:

- can it answer the benchmark's questions from the text alone? Given the
  scene as an English sentence, each multiple-choice question is scored the
  way ``tools/eval.py`` scores it (the sum of the option's token
  log-probabilities after the chat prompt); every attribute must be answered
  at least ``accuracy_factor`` times as often as chance. A prior that cannot
  use the content when it reads it cannot use it from an image either.
- does its prior conflict with the captions' style? The mean negative
  log-likelihood per token of a style-B caption ("[ top ] circle / red .")
  must exceed that of the same scene in English by ``nll_margin`` nats.
"""
import json
import os
import os.path as osp
import random
import statistics
from typing import Callable, Dict, List

from mmengine.config import Config

from dpa.analysis.prior_conflict.language import (ATTRIBUTES, NATURAL_QUESTIONS, natural_answer,
                                                  natural_sentence, random_scene,
                                                  style_b_caption)
from dpa.analysis.prior_conflict.prior_llm import PriorGateError
from dpa.engine.paths import fill_path_variables
from dpa.evaluation.evaluator import score_continuations
from dpa.evaluation.models import CausalLMScorer, chat_prompt
from dpa.models.builders import PROCESSORS
from dpa.registry import MODELS

GATE = dict(samples=30, accuracy_factor=2.0, nll_margin=2.0, seed=1)
GATE_FILE = 'prior_gates.json'
CAPTION_PROMPT = 'Describe the image briefly.'


def _prompt_ids(tokenizer, user: str) -> List[int]:
    """The evaluator's prompt of a text-only question, as token ids."""
    return tokenizer(chat_prompt(tokenizer, user, has_image=False),
                     add_special_tokens=False).input_ids


def gates(model, tokenizer, gate: dict = GATE, batch_size: int = 32) -> Dict[str, float]:
    """Text-alone accuracy per attribute and the per-token NLL of both styles.

    Scored with the evaluator's :func:`score_continuations`: one pass over
    each prompt, its options continuing from the prompt's keys and values
    (the caption prompt, the same for every caption, runs once a batch);
    ``batch_size`` continuations a pass."""
    rng = random.Random(gate['seed'])
    questions = {}  # attribute -> [(index of its first option's item, the answer)]
    items = []
    for attribute, values in ATTRIBUTES.items():
        questions[attribute] = []
        for _ in range(gate['samples']):
            scene = random_scene(rng)
            prompt = _prompt_ids(tokenizer,
                                 f'{natural_sentence(scene)} {NATURAL_QUESTIONS[attribute]}')
            start = len(items)
            items += [(prompt, None, tokenizer(natural_answer(attribute, dict(scene, **{
                attribute: v})), add_special_tokens=False).input_ids) for v in values]
            questions[attribute].append((start, scene[attribute]))
    captions = {'a': [], 'b': []}  # style -> item indices
    prompt = _prompt_ids(tokenizer, CAPTION_PROMPT)
    for _ in range(gate['samples']):
        scene = random_scene(rng)
        for style, text in (('a', natural_sentence(scene)), ('b', style_b_caption(scene))):
            captions[style].append(len(items))
            items.append((prompt, None, tokenizer(text, add_special_tokens=False).input_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [logp for logp, _ in score_continuations(CausalLMScorer(model, pad_id), items,
                                                      batch_size)]
    result = {}
    for attribute, values in ATTRIBUTES.items():
        correct = 0
        for start, answer in questions[attribute]:
            options = scores[start:start + len(values)]
            correct += values[options.index(max(options))] == answer
        result[f'text_accuracy_{attribute}'] = correct / gate['samples']
    for style in ('a', 'b'):
        result[f'nll_style_{style}'] = statistics.mean(
            -scores[i] / len(items[i][2]) for i in captions[style])
    return result


def passed(result: Dict[str, float], gate: dict = GATE) -> bool:
    return (all(result[f'text_accuracy_{name}'] >= gate['accuracy_factor'] / len(values)
                for name, values in ATTRIBUTES.items())
            and result['nll_style_b'] - result['nll_style_a'] >= gate['nll_margin'])


def check_real_prior(config_path: str, data_root: str, out_dir: str,
                     log: Callable[[str], None] = print, gate: dict = GATE) -> dict:
    """Load the LLM of a benchmark config (its ``llm`` and ``tokenizer``) and
    check its gates; the result is cached in ``out_dir`` for that checkpoint.

    Raises:
        PriorGateError: a gate did not pass.
    """
    cfg = Config.fromfile(config_path)
    cfg.data_root = data_root
    fill_path_variables(cfg)
    key = dict(llm=cfg.llm.to_dict(), gate=gate)
    path = osp.join(out_dir, GATE_FILE)
    if osp.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get('key') == key:
            log(f'prior LLM: {cfg.llm.pretrained}, gates cached in {path}')
            return cached
    model = MODELS.build(cfg.llm).eval()
    result = gates(model, PROCESSORS.build(cfg.tokenizer), gate)
    log('prior LLM gates: ' + ', '.join(f'{k} {v:.3f}' for k, v in result.items()))
    if not passed(result, gate):
        raise PriorGateError(
            f'the LLM {cfg.llm.pretrained} failed the real-prior gates ({result}): every '
            f'attribute must be answered from the text alone at least {gate["accuracy_factor"]}'
            f' times as often as chance, and style-B captions must cost at least '
            f'{gate["nll_margin"]} nats a token more than English ones')
    os.makedirs(out_dir, exist_ok=True)
    cached = dict(result, key=key, llm=cfg.llm.pretrained)
    with open(path, 'w') as f:
        json.dump(cached, f, indent=2)
    return cached
