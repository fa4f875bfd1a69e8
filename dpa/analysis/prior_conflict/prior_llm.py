"""Pre-training the benchmark's prior LLM on style A, with gates that check it
can copy from its context and finds style B unlikely; cached as a checkpoint
directory (model + tokenizer) that configs load like any other."""
import json
import math
import os
import os.path as osp
import random
import shutil
import time
from typing import Callable, Dict, Optional

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dpa.analysis.prior_conflict.language import (ATTRIBUTES, STYLE_B_TOKENS, build_tokenizer,
                                                  chat, corpus_document, qa_turns, random_scene,
                                                  style_a_bag, style_a_sentence)

# The recipe that passed its gates (docs/prior_conflict.md).
RECIPE = dict(layers=3, hidden=128, heads=4, kv_heads=2, intermediate=512, documents=60000,
              batch=64, lr=2e-3, steps=1500, check_every=250, seed=0, copy_gate=0.9,
              style_b_gate=1e-3, gate_samples=50)
GATE_FILE = 'prior_gates.json'


class PriorGateError(RuntimeError):
    """The prior LLM did not learn what the benchmark needs."""


def new_model(vocab_size: int, recipe: dict) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=recipe['hidden'],
                         intermediate_size=recipe['intermediate'],
                         num_hidden_layers=recipe['layers'],
                         num_attention_heads=recipe['heads'],
                         num_key_value_heads=recipe['kv_heads'], max_position_embeddings=256,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


def _batches(documents, tokenizer, batch: int, rng: random.Random):
    while True:
        order = list(range(len(documents)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch + 1, batch):
            encoded = tokenizer([documents[i] for i in order[start:start + batch]],
                                add_special_tokens=False, padding=True, return_tensors='pt')
            labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
            yield encoded.input_ids, encoded.attention_mask, labels


@torch.no_grad()
def gates(model, tokenizer, recipe: dict, seed: int = 1) -> Dict[str, float]:
    """Greedy copy accuracy per (attribute, context form) on fresh scenes, and
    the largest probability of a style-B token after style-A text."""
    model.eval()
    rng = random.Random(seed)
    results = {}
    for form, context in (('sentence', style_a_sentence), ('bag', style_a_bag)):
        for name in ATTRIBUTES:
            prompts, answers = [], []
            for _ in range(recipe['gate_samples']):
                scene = random_scene(rng)
                turn = [t for t in qa_turns(rng, scene, 3) if t[0] == name]
                prompts.append(tokenizer.apply_chat_template(
                    chat(context(rng, scene), turn)[:1], tokenize=False,
                    add_generation_prompt=True))
                answers.append(tokenizer.convert_tokens_to_ids(scene[name]))
            next_ids = _next_token_logits(model, tokenizer, prompts).argmax(-1)
            results[f'copy_{name}_{form}'] = float(
                (next_ids == torch.tensor(answers)).float().mean())
    prompts = [style_a_sentence(rng, random_scene(rng)) for _ in range(recipe['gate_samples'])]
    probs = _next_token_logits(model, tokenizer, prompts).softmax(-1)
    style_b = tokenizer.convert_tokens_to_ids(list(STYLE_B_TOKENS))
    results['style_b_probability'] = float(probs[:, style_b].max())
    model.train()
    return results


def _next_token_logits(model, tokenizer, prompts):
    tokenizer.padding_side = 'left'
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors='pt')
    tokenizer.padding_side = 'right'
    positions = (encoded.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(**encoded, position_ids=positions).logits[:, -1]


def passed(result: Dict[str, float], recipe: dict) -> bool:
    copies = [v for k, v in result.items() if k.startswith('copy_')]
    return (min(copies) >= recipe['copy_gate']
            and result['style_b_probability'] < recipe['style_b_gate'])


def pretrain_prior(out_dir: str, recipe: Optional[dict] = None,
                   log: Callable[[str], None] = print) -> dict:
    """Train (or reuse, when ``out_dir`` holds a model made with the same
    recipe) the prior LLM; return its gate results.

    Raises:
        PriorGateError: the gates did not pass within the recipe's steps.
    """
    recipe = dict(RECIPE, **(recipe or {}))
    gate_path = osp.join(out_dir, GATE_FILE)
    if osp.exists(gate_path):
        with open(gate_path) as f:
            cached = json.load(f)
        if cached.get('recipe') == recipe:
            log(f'prior LLM: cached at {out_dir} (gates passed at step {cached["step"]})')
            return cached
    torch.manual_seed(recipe['seed'])
    rng = random.Random(recipe['seed'])
    tokenizer = build_tokenizer()
    documents = [corpus_document(rng, tokenizer) for _ in range(recipe['documents'])]
    model = new_model(len(tokenizer), recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe['lr'], weight_decay=0.0)

    def cosine(step):
        return 0.5 * (1 + math.cos(math.pi * min(step, recipe['steps']) / recipe['steps']))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    batches = _batches(documents, tokenizer, recipe['batch'], rng)
    start, result = time.time(), None
    for step in range(1, recipe['steps'] + 1):
        input_ids, attention_mask, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % recipe['check_every'] == 0 or step == recipe['steps']:
            result = gates(model, tokenizer, recipe)
            log(f'prior LLM step {step}: loss {loss.item():.3f}, worst copy '
                f"{min(v for k, v in result.items() if k.startswith('copy_')):.2f}, style-B "
                f"probability {result['style_b_probability']:.1e} ({time.time() - start:.0f} s)")
            if passed(result, recipe):
                break
    if not passed(result, recipe):
        raise PriorGateError(
            f'the prior LLM failed its gates after {recipe["steps"]} steps ({result}): it must '
            f'copy every attribute from its context (>= {recipe["copy_gate"]}) and give style-B '
            f'tokens < {recipe["style_b_gate"]}; without that no variant can learn from the '
            'image')
    tmp = f'{out_dir}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cached = dict(result, step=step, seconds=round(time.time() - start), recipe=recipe)
    with open(osp.join(tmp, GATE_FILE), 'w') as f:
        json.dump(cached, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return cached
