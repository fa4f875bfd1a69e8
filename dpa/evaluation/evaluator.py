"""Scoring evaluation rows with a model, and the files a run writes.

Multiple choice (a row with ``options``): each option's score is the sum of
the log-probabilities of its tokens (tokenised alone, without special tokens)
appended to the prompt's tokens; the prediction is the best option, the first
one on ties. The prompt (image and question) runs once per row and the
options continue from its keys and values, which gives the scores of the
full sequences (see :func:`score_continuations`). Open questions: greedy
generation until an end-of-turn token (at most ``MAX_NEW_TOKENS``), correct
when it equals the answer once both are lower-cased and stripped of
surrounding whitespace and punctuation.

The no-image control: the rows that show a picture are asked again without
it (the same question, text only), and their accuracy is reported beside the
real one (``no_image`` in ``metrics.json``, a column of the table). A model
that reads the picture loses accuracy without it; one that answers from the
question's wording alone keeps it.
"""
import json
import os
import os.path as osp
import sys
from collections import defaultdict
from typing import Callable, List, Optional, Tuple

import torch
from tqdm import tqdm

from dpa.artifacts import atomic_write
from dpa.evaluation.data import EvalDataError, normalize_answer, read_eval_rows
from dpa.evaluation.models import default_device, load_eval_model, load_image

MAX_NEW_TOKENS = 64
METRICS_FILE = 'metrics.json'
PREDICTIONS_FILE = 'predictions.jsonl'
NO_IMAGE_PREDICTIONS_FILE = 'predictions_no_image.jsonl'
BAD_ROWS_FILE = 'bad_rows.jsonl'


class BadRowsError(ValueError):
    """The data has bad rows and the run was not told to skip them.

    Args:
        problems: one record per bad row (file, row, id, reason, detail).
        report: where they were written.
    """

    def __init__(self, problems: List[dict], report: Optional[str], all_bad: bool = False):
        reasons = defaultdict(int)
        for p in problems:
            reasons[p['reason']] += 1
        listing = ', '.join(f'{count} x {reason}' for reason, count in sorted(reasons.items()))
        first = problems[0]
        super().__init__(
            f'{len(problems)} bad row(s) in the evaluation data ({listing}), e.g. '
            f"{first['file']} row {first['row']}: {first['detail']}"
            + (f'; every one is listed in {report}' if report else '')
            + ('. Every row is bad: fix them' if all_bad else
               '. Fix them, or pass --skip-bad-rows to score the other rows'))
        self.problems, self.report = problems, report


class EvaluationInterrupted(RuntimeError):
    """A signal asked the evaluation to stop (see ``interrupted`` of :func:`evaluate`)."""

    def __init__(self, signum: int):
        super().__init__(f'evaluation interrupted by signal {signum}')
        self.signum = signum


def _check_interrupted(interrupted: Optional[Callable[[], Optional[int]]]):
    signum = interrupted() if interrupted is not None else None
    if signum:
        raise EvaluationInterrupted(signum)


def _batches(items, size, interrupted: Optional[Callable[[], Optional[int]]] = None):
    for start in range(0, len(items), size):
        _check_interrupted(interrupted)
        yield items[start:start + size]


def option_ids(tokenizer, option: str) -> List[int]:
    ids = tokenizer(option, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f'option {option!r} tokenises to nothing')
    return ids


def score_continuations(model, items, batch_size: int, progress=None, interrupted=None,
                        share_prompts: bool = True) -> List[Tuple[float, bool]]:
    """The summed log-probability of each continuation after its prompt, and
    whether greedy decoding would produce it.

    Items with the same prompt (equal ids and the same pixel values object:
    a row's options) share one pass over it when the model keeps a key/value
    cache (``model.prefix_cache``): see :func:`_score_shared_prompts`. The
    scores equal those of the full sequences (:func:`_score_full_sequences`,
    used otherwise) up to float rounding (tests/test_eval.py).

    Args:
        model: a ``NativeEvalModel``, ``HFLlavaEvalModel`` or ``CausalLMScorer``.
        items: ``(prompt ids, pixel values or None, continuation ids)`` each.
        batch_size: continuations per forward pass; with shared prompts, the
            prompts of a batch are those of its continuations (a prompt with
            more continuations than ``batch_size`` is a batch of its own).
        progress: a tqdm bar advanced by one per continuation.
        interrupted: see :func:`_batches`.
        share_prompts: False runs every item's full sequence.
    """
    if not (share_prompts and getattr(model, 'prefix_cache', None)):
        return _score_full_sequences(model, items, batch_size, progress, interrupted)
    groups = {}  # (prompt ids, pixels' identity) -> the indices of its items
    for index, (ids, pixels, _) in enumerate(items):
        groups.setdefault((tuple(ids), id(pixels)), []).append(index)
    results = [None] * len(items)
    for batch in group_batches(list(groups.values()), batch_size, interrupted):
        prompts = [items[group[0]] for group in batch]
        indices = [index for group in batch for index in group]
        scored = _score_shared_prompts(
            model, [ids for ids, _, _ in prompts], [pixels for _, pixels, _ in prompts],
            [items[index][2] for index in indices],
            [g for g, group in enumerate(batch) for _ in group])
        if scored is None:  # the model returned no cache it can reorder
            model.prefix_cache = None
            scored = _score_full_sequences(model, [items[i] for i in indices], batch_size)
        for index, result in zip(indices, scored):
            results[index] = result
        if progress is not None:
            progress.update(len(indices))
    return results


def group_batches(groups, size: int, interrupted=None):
    """Batches of consecutive groups (lists) holding at most ``size`` items
    together, a larger group alone: a group is never split. ``interrupted``:
    see :func:`_batches`."""
    batch, count = [], 0
    for group in groups:
        if batch and count + len(group) > size:
            _check_interrupted(interrupted)
            yield batch
            batch, count = [], 0
        batch.append(group)
        count += len(group)
    if batch:
        _check_interrupted(interrupted)
        yield batch


def _score_shared_prompts(model, prompts, pixels, continuations, owners):
    """Continuations scored after one pass over their prompts.

    The left-padded prompts run once, keeping their keys and values; the
    last position's logits predict each continuation's first token. The
    continuations then run as one right-padded batch (all tokens but the
    last, which nothing after it needs) on the cache of their own prompt
    (``owners``: the index of each one's prompt), with the prompt's attention
    mask before their own and position ids going on from the prompt's real
    length: the same inputs, position for position, as the full sequence.

    Returns:
        ``(sum of log-probabilities, greedy)`` per continuation, or None when
        the model's cache cannot be reordered by batch row.
    """
    last, cache, prompt_mask = model.prompt_pass(prompts, [p for p in pixels if p is not None])
    if not hasattr(cache, 'batch_select_indices'):
        return None
    device = last.device
    owners = torch.as_tensor(owners, device=device)
    logps = torch.log_softmax(last[owners], dim=-1)[:, None]  # (n, 1, vocab)
    longest = max(len(c) for c in continuations)
    if longest > 1:
        fed = torch.full((len(continuations), longest - 1), model.pad_id, dtype=torch.long)
        fed_mask = torch.zeros_like(fed)
        for row, continuation in enumerate(continuations):
            if len(continuation) > 1:
                fed[row, :len(continuation) - 1] = torch.as_tensor(continuation[:-1])
                fed_mask[row, :len(continuation) - 1] = 1
        prompt_mask = prompt_mask.to(device)
        position_ids = (prompt_mask.sum(-1)[owners, None]
                        + torch.arange(longest - 1, device=device))
        cache.batch_select_indices(owners)  # one cache row per continuation
        logits = model.continuation_logits(
            fed.to(device), torch.cat([prompt_mask[owners], fed_mask.to(device)], dim=1),
            position_ids, cache)
        logps = torch.cat([logps, torch.log_softmax(logits, dim=-1)], dim=1)
    results = []
    for row, continuation in enumerate(continuations):
        n = len(continuation)
        targets = torch.as_tensor(continuation, device=device)
        rows = logps[row, :n]
        results.append((float(rows[torch.arange(n, device=device), targets].double().sum()),
                        bool((rows.argmax(-1) == targets).all())))
    return results


def _score_full_sequences(model, items, batch_size: int, progress=None,
                          interrupted=None) -> List[Tuple[float, bool]]:
    """:func:`score_continuations` by running each item's full sequence
    (prompt and continuation, left-padded), ``batch_size`` at a time."""
    results = []
    for batch in _batches(items, batch_size, interrupted):
        sequences = [ids + continuation for ids, _, continuation in batch]
        pixels = [p for _, p, _ in batch if p is not None]
        keep = max(len(continuation) for _, _, continuation in batch) + 1
        logps = torch.log_softmax(model.last_logits(sequences, pixels, keep), dim=-1)
        for b, (_, _, continuation) in enumerate(batch):
            # Left padding puts the continuation at the end: position keep-n-1+j predicts token j.
            n = len(continuation)
            positions = torch.arange(keep - n - 1, keep - 1)
            targets = torch.as_tensor(continuation, device=logps.device)
            rows = logps[b, positions]
            results.append((float(rows[torch.arange(n), targets].double().sum()),
                            bool((rows.argmax(-1) == targets).all())))
        if progress is not None:
            progress.update(len(batch))
    return results


def score_options(model, prompts, rows, batch_size: int, progress=None,
                  interrupted=None) -> List[List[float]]:
    """Each option's summed token log-probability after its row's prompt.

    Args:
        model: a ``NativeEvalModel`` or ``HFLlavaEvalModel``.
        prompts: ``(ids, pixel_values)`` of each row.
        rows: the rows (with ``options``).
        batch_size: options per forward pass (see :func:`score_continuations`).
        progress: a tqdm bar advanced by one per option.
    """
    items = [(prompts[r][0], prompts[r][1], option_ids(model.tokenizer, option))
             for r, row in enumerate(rows) for option in row['options']]
    scores = iter(score_continuations(model, items, batch_size, progress, interrupted))
    return [[next(scores)[0] for _ in row['options']] for row in rows]


def generate_answers(model, prompts, batch_size: int, max_new_tokens: int = MAX_NEW_TOKENS,
                     progress=None, interrupted=None) -> List[str]:
    """Greedy answers, cut at the first end-of-turn token, special tokens dropped."""
    answers = []
    stops = set(model.end_of_turn_ids)
    for batch in _batches(prompts, batch_size, interrupted):
        pixels = [p for _, p in batch if p is not None]
        for new in model.generate([ids for ids, _ in batch], pixels, max_new_tokens):
            cut = next((i for i, token in enumerate(new) if token in stops), len(new))
            answers.append(model.tokenizer.decode(new[:cut], skip_special_tokens=True).strip())
        if progress is not None:
            progress.update(len(batch))
    return answers


def predict(model, rows: List[dict], batch_size: int = 8, show_progress: bool = True,
            max_new_tokens: int = MAX_NEW_TOKENS, interrupted=None,
            with_images: bool = True) -> List[dict]:
    """One prediction record per row: id, type, prediction, answer, correct,
    and ``option_scores`` for multiple choice. ``interrupted``: called before
    each batch; a signal number it returns stops with :class:`EvaluationInterrupted`.
    ``with_images=False`` asks every question without its picture."""
    def image(row):
        return load_image(row['image_path']) if with_images else None

    if batch_size < 1:
        raise ValueError(f'batch size must be at least 1, got {batch_size}')
    choice = [r for r in rows if r['options'] is not None]
    open_rows = [r for r in rows if r['options'] is None]
    total = sum(len(r['options']) for r in choice) + len(open_rows)
    bar = tqdm(total=total, desc='evaluating', unit='seq',
               disable=not (show_progress and sys.stderr.isatty()))
    with bar:
        choice_prompts = [model.prompt(r['question'], image(r)) for r in choice]
        scores = score_options(model, choice_prompts, choice, batch_size, bar, interrupted)
        del choice_prompts
        open_prompts = [model.prompt(r['question'], image(r)) for r in open_rows]
        answers = generate_answers(model, open_prompts, batch_size, max_new_tokens, bar,
                                   interrupted)
    records = {}
    for row, option_scores in zip(choice, scores):
        best = max(range(len(option_scores)), key=option_scores.__getitem__)  # first on ties
        prediction = row['options'][best]
        records[id(row)] = dict(prediction=prediction, correct=prediction == row['answer'],
                                option_scores=dict(zip(row['options'], option_scores)))
    for row, answer in zip(open_rows, answers):
        records[id(row)] = dict(
            prediction=answer, correct=normalize_answer(answer) == normalize_answer(row['answer']))
    return [dict(id=row['id'], type=row['type'], answer=row['answer'], **records[id(row)])
            for row in rows]


def _accuracy(records) -> dict:
    n = len(records)
    summary = dict(n=n, accuracy=sum(r['correct'] for r in records) / n if n else None)
    choice = [r for r in records if 'option_scores' in r]
    if choice:
        summary['chance'] = sum(1 / len(r['option_scores']) for r in choice) / len(choice)
    return summary


def compute_metrics(predictions: List[dict]) -> dict:
    """``accuracy`` and ``n`` over all rows; ``chance`` (mean of 1/number of
    options over the multiple-choice rows); the same per ``type`` and for
    ``multiple_choice`` / ``open`` rows."""
    metrics = _accuracy(predictions)
    by_type = defaultdict(list)
    for record in predictions:
        if record['type'] is not None:
            by_type[record['type']].append(record)
    if by_type:
        metrics['per_type'] = {t: _accuracy(rs) for t, rs in sorted(by_type.items())}
    metrics['multiple_choice'] = _accuracy([r for r in predictions if 'option_scores' in r])
    metrics['open'] = _accuracy([r for r in predictions if 'option_scores' not in r])
    return metrics


def _percent(value) -> str:
    return '-' if value is None else f'{value:.1%}'


def format_table(metrics: dict) -> str:
    """A short table: rows per type and overall, accuracy, chance and (when
    measured) the accuracy of the same questions without their pictures."""
    no_image = metrics.get('no_image')
    lines = [f"{'':<16}{'n':>6}{'accuracy':>10}{'chance':>9}"
             + (f"{'no image':>10}" if no_image else '')]
    groups = list(metrics.get('per_type', {}).items()) + [('all', metrics)]
    for name, m in groups:
        line = (f"{name:<16}{m['n']:>6}{_percent(m['accuracy']):>10}"
                f"{_percent(m.get('chance')):>9}")
        if no_image:
            control = no_image if name == 'all' else no_image.get('per_type', {}).get(name, {})
            line += f"{_percent(control.get('accuracy')):>10}"
        lines.append(line)
    lmms = metrics.get('lmms_eval')
    if lmms:
        lines.append(f"lmms-eval model {lmms['model']}: {lmms['pretrained']}")
        for task, values in lmms['results'].items():
            for metric, value in values.items():
                if isinstance(value, (int, float)):
                    lines.append(f'lmms-eval {task} {metric}: {value:.4f}')
        for task, agree in lmms.get('agreement', {}).items():
            lines.append(f"lmms-eval {task} answers equal to the built-in evaluator's: "
                         f"{agree['agree']}/{agree['rows']} rows ({agree['rate']:.1%})")
    return '\n'.join(lines)


def evaluate(model_path: str, data: str, image_folder: str = '', out_dir: Optional[str] = None,
             batch_size: int = 8, device: Optional[str] = None, skip_bad_rows: bool = False,
             pad_to_square: Optional[bool] = None, show_progress: bool = True,
             verify: bool = True, interrupted=None, no_image_control: bool = True) -> dict:
    """Score the model at ``model_path`` on ``data``; write ``metrics.json``
    and ``predictions.jsonl`` (and ``bad_rows.jsonl`` when rows are bad) to
    ``out_dir``; return the metrics.

    Args:
        model_path: a work dir, native model dir or ``hf_llava`` dir.
        data: json/jsonl evaluation rows (see :mod:`dpa.evaluation.data`).
        image_folder: what the rows' image paths are relative to.
        out_dir: where the files go; None writes nothing.
        batch_size: options (or open questions) per forward pass.
        device: default ``cuda`` when available, else ``cpu``.
        skip_bad_rows: score the good rows when some are bad (they are listed
            and counted in ``skipped_rows``) instead of raising.
        pad_to_square: native models: override the recorded preprocessing.
        verify: check the model's files against its manifest's sha256 first.
        interrupted: see :func:`predict`.
        no_image_control: also ask the rows with a picture without it, and
            report that accuracy as ``no_image`` (see the module's docstring).

    Raises:
        EvalDataError: the data file cannot be read or holds no rows.
        BadRowsError: bad rows, without ``skip_bad_rows``.
        ModelLoadError: ``model_path`` is no model the evaluator knows.
    """
    rows, problems = read_eval_rows(data, image_folder)
    report = osp.join(out_dir, BAD_ROWS_FILE) if out_dir else None
    if report and problems:
        atomic_write(''.join(json.dumps(p) + '\n' for p in problems), report)
    elif report and osp.exists(report):  # from an earlier run on other data
        os.remove(report)
    report = report if problems else None
    if problems and not (skip_bad_rows and rows):
        raise BadRowsError(problems, report, all_bad=not rows)
    if not rows:
        raise EvalDataError(f'{data} holds no rows: an evaluation file is a json list or jsonl '
                            'of {"id", "image", "question", "answer", "options"} rows')
    model = load_eval_model(model_path, device or default_device(), pad_to_square, verify)
    predictions = predict(model, rows, batch_size, show_progress, interrupted=interrupted)
    metrics = dict(compute_metrics(predictions), skipped_rows=len(problems),
                   model=osp.abspath(model.name), model_format=model.kind,
                   data=osp.abspath(data))
    pictured = [row for row in rows if row['image_path'] is not None]
    control = []
    if no_image_control and pictured:
        control = predict(model, pictured, batch_size, show_progress, interrupted=interrupted,
                          with_images=False)
        metrics['no_image'] = compute_metrics(control)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for records, name in ((predictions, PREDICTIONS_FILE),
                              (control, NO_IMAGE_PREDICTIONS_FILE)):
            path = osp.join(out_dir, name)
            if records:
                atomic_write(''.join(json.dumps(p) + '\n' for p in records), path)
            elif osp.exists(path):  # from an earlier run
                os.remove(path)
        write_metrics(metrics, out_dir)
    return metrics


def read_predictions(out_dir: str) -> List[dict]:
    """The prediction records :func:`evaluate` wrote to ``out_dir``."""
    with open(osp.join(out_dir, PREDICTIONS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_metrics(metrics: dict, out_dir: str) -> str:
    path = osp.join(out_dir, METRICS_FILE)
    atomic_write(json.dumps(metrics, indent=2), path)
    return path
