"""Word-level visual relevance: for every supervised target token, its
probability with the image (``p_img``), without it (``p_txt``), and the weight
the stage's loss gives it, computed by the loss's own code
(:meth:`VisualRelevanceLoss.token_scores`), smoothing included."""
import html
import json
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

from dpa.datasets.llava import BadSampleError, bad_row_record, dpa_collate
from dpa.models.losses import IGNORE_INDEX, VisualRelevanceLoss

TOKEN_FIELDS = ('model', 'id', 'position', 'token', 'token_id', 'p_img', 'p_txt', 'delta',
                'weight')


def analysis_rows(dataset, num: int):
    """The first ``num`` good samples of ``dataset`` as (id, sample) pairs, and
    the bad rows met on the way (reported like training reports them)."""
    samples, skipped = [], []
    for index in range(len(dataset)):
        if len(samples) == num:
            break
        info = dataset.get_data_info(index)
        try:
            sample = dataset.prepare_data(index)
        except BadSampleError as err:
            skipped.append(bad_row_record(info['source'], info['row_index'], info['row'], err))
            continue
        row = info['row']
        row_id = row.get('id') if isinstance(row, dict) else None
        samples.append((str(row_id if row_id is not None else
                            f"{info['source']}:{info['row_index']}"), sample))
    return samples, skipped


@torch.no_grad()
def token_records(model, loss: VisualRelevanceLoss, samples, tokenizer,
                  model_name: str = 'model') -> List[dict]:
    """One record per supervised target token of each sample (a batch of one,
    so a token's smoothing window holds its own sample's tokens; in the
    ``reference`` scope training's windows also cross into batch neighbours).

    Args:
        model: a ``LlavaDPAModel``.
        loss: the stage's loss; a ``vanilla`` one gives every token weight 1.
        samples: (id, sample) pairs from :func:`analysis_rows`.
        tokenizer: decodes the tokens.
        model_name: stored in each record's ``model``.
    """
    probability = VisualRelevanceLoss(mode='cmo', window=loss.window, scope=loss.scope)
    records = []
    for row_id, sample in samples:
        batch = dpa_collate([sample])
        inputs = model.loss_inputs(batch['input_ids'], batch['attention_mask'], batch['labels'],
                                   batch['pixel_values'], image_sizes=batch.get('image_sizes'))
        scores = (loss.token_scores(**inputs, score_all_text=True) if loss.mode != 'vanilla'
                  else None)
        # CMO scores with the probabilities already; CAL (logits) and vanilla need them.
        probs = (scores if loss.mode == 'cmo'
                 else probability.token_scores(**inputs, score_all_text=True))
        if scores is None:
            scores = probs
        targets = inputs['targets'][0]
        for t in (targets != IGNORE_INDEX).nonzero().squeeze(-1).tolist():
            token_id = int(targets[t])
            weight = 1.0 if loss.mode == 'vanilla' else float(scores['weight'][0, t])
            records.append(dict(model=model_name, id=row_id, position=t + 1,
                                token=tokenizer.decode([token_id]), token_id=token_id,
                                p_img=float(probs['score_img'][0, t]),
                                p_txt=float(probs['score_txt'][0, t]),
                                delta=float(scores['delta'][0, t]), weight=weight))
    return records


def write_jsonl(records: Sequence[dict], path: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(record) + '\n' for record in records)


def read_jsonl(path: str) -> List[dict]:
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def colour_level(value: float, clamp) -> float:
    """0..1: where ``value`` lies between the clamp bounds."""
    low, high = clamp
    return 0.0 if high == low else min(max((value - low) / (high - low), 0.0), 1.0)


def write_html(records: Sequence[dict], path: str, clamp, descriptions: Dict[str, str],
               colour_by: str = 'weight') -> None:
    """Each sample's target text, every token coloured by its weight (darker
    red: the image explains it more); hovering shows p_img, p_txt, delta and
    weight. ``colour_by='delta'`` colours by the clamped difference instead
    (a vanilla loss weighs every token 1)."""
    groups = defaultdict(list)
    for record in records:
        groups[(record['model'], record['id'])].append(record)
    parts = ['<!doctype html><meta charset="utf-8"><title>DPA visual relevance</title>',
             '<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}'
             '.s{margin:1em 0;padding:.5em;border:1px solid #ddd;white-space:pre-wrap;'
             'font-family:monospace}.t{border-radius:2px}h3{margin:.2em 0;font-size:90%}</style>',
             '<h1>Visual relevance of target tokens</h1>',
             f'<p>Colour: the token\'s {colour_by} from {clamp[0]} (white) to {clamp[1]} (red); '
             'hover a token for p(y|image, text), p(y|text), their difference and the '
             'weight.</p>']
    for name, text in descriptions.items():
        parts.append(f'<p><b>{html.escape(name)}</b>: {html.escape(text)}</p>')
    for (name, row_id), tokens in groups.items():
        parts.append(f'<div class="s"><h3>{html.escape(name)} · {html.escape(row_id)}</h3>')
        for record in tokens:
            alpha = colour_level(record[colour_by], clamp)
            tip = (f"p_img={record['p_img']:.4f} p_txt={record['p_txt']:.4f} "
                   f"delta={record['delta']:+.4f} weight={record['weight']:.4f}")
            parts.append(f'<span class="t" style="background:rgba(220,30,30,{alpha:.3f})" '
                         f'title="{html.escape(tip)}">{html.escape(record["token"])}</span>')
        parts.append('</div>')
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(parts) + '\n')


def word_weights(records: Sequence[dict], top: int = 20) -> List[tuple]:
    """(word, count, mean weight) of the ``top`` most frequent target tokens
    (whitespace stripped; tokens that are only whitespace left out)."""
    weights = defaultdict(list)
    for record in records:
        word = record['token'].strip()
        if word:
            weights[word].append(record['weight'])
    ranked = sorted(weights.items(), key=lambda item: (-len(item[1]), item[0]))[:top]
    return [(word, len(values), sum(values) / len(values)) for word, values in ranked]


def summary(records: Sequence[dict], clamp) -> dict:
    """Token count, mean weight and share of tokens at each clamp bound."""
    n = max(len(records), 1)
    return dict(tokens=len(records),
                weight_mean=sum(r['weight'] for r in records) / n,
                at_min=sum(r['delta'] <= clamp[0] for r in records) / n,
                at_max=sum(r['delta'] >= clamp[1] for r in records) / n,
                delta_mean=sum(r['delta'] for r in records) / n)
