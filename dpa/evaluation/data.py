"""Evaluation rows: ``{"id", "image", "question", "answer", "options", "type"}``
in a json list or jsonl file, checked before any model runs.

A bad row is reported like ``tools/check_data.py`` reports training rows (file,
0-based row, id, reason, detail), never dropped silently.
"""
import os.path as osp
import string
from typing import List, Optional, Tuple

from dpa.datasets.llava import BadSampleError, bad_row_record, open_image, read_rows
from dpa.datasets.validation import duplicate_ids

# Reasons of a bad evaluation row, besides check_data's image and json ones.
ROW_REASONS = ('not_an_object', 'missing_question', 'missing_answer', 'bad_options',
               'answer_not_in_options', 'bad_image_field', 'bad_type', 'bad_id')


class EvalDataError(ValueError):
    """The evaluation data file cannot be read at all."""


def check_row(row, image_folder: str) -> dict:
    """The row as the evaluator uses it; raises :class:`BadSampleError`."""
    if not isinstance(row, dict):
        raise BadSampleError('not_an_object', f'a row is a json object, got {type(row).__name__}')
    if 'id' in row and not isinstance(row['id'], (str, int)):
        raise BadSampleError('bad_id', f'id must be a string or an integer, got {row["id"]!r}')
    question, answer = row.get('question'), row.get('answer')
    if not isinstance(question, str) or not question.strip():
        raise BadSampleError('missing_question', 'row has no question text')
    if not isinstance(answer, str) or not answer.strip():
        raise BadSampleError('missing_answer', 'row has no answer text')
    options = row.get('options')
    if options is not None:
        if (not isinstance(options, list) or len(options) < 2
                or not all(isinstance(o, str) and o.strip() for o in options)):
            raise BadSampleError('bad_options', 'options must be a list of at least two '
                                 f'non-empty strings, got {options!r}')
        if len(set(options)) != len(options):
            raise BadSampleError('bad_options', f'options repeat an entry: {options!r}')
        if answer not in options:
            raise BadSampleError('answer_not_in_options',
                                 f'answer {answer!r} is not one of the options {options!r}')
    if 'type' in row and not isinstance(row['type'], str):
        raise BadSampleError('bad_type', f'type must be a string, got {row["type"]!r}')
    image_path = None
    if 'image' in row:
        # As in training: a null or empty image is a mistake, not a text-only
        # question (which leaves the key out).
        if not isinstance(row['image'], str) or not row['image'].strip():
            raise BadSampleError('bad_image_field', 'image must be a non-empty path string '
                                 f'(leave the key out for a text-only question), got '
                                 f'{row["image"]!r}')
        image_path = osp.join(image_folder, row['image'])
        # Decoded once here to find broken files before any model runs; not
        # kept, so a large benchmark does not sit in memory.
        open_image(image_path)
    return dict(id=row.get('id'), question=question, answer=answer, options=options,
                type=row.get('type'), image_path=image_path)


def read_eval_rows(path: str, image_folder: str = '') -> Tuple[List[dict], List[dict]]:
    """Checked rows of an evaluation file and the problems of its bad rows.

    Args:
        path: a json (list of rows) or jsonl (one row a line) file.
        image_folder: the folder rows' ``image`` paths are relative to.

    Returns:
        ``(rows, problems)``: each good row with its ``image_path`` (None
        without an image; the file was found readable) and its ``id`` (the
        0-based row index as a string when the row has none); one record per
        bad row (file, row, id, reason, detail).

    Raises:
        EvalDataError: the file is missing, unreadable or not a json list.
    """
    problems = []
    try:
        indexed = read_rows(path, problems)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise EvalDataError(f'cannot read evaluation data {path}: {err}') from None
    rows, checked = [], []
    for index, row in indexed:
        try:
            good = check_row(row, image_folder)
        except BadSampleError as err:
            problems.append(bad_row_record(path, index, row, err))
            continue
        if good['id'] is None:
            good['id'] = str(index)
        rows.append(good)
        checked.append((path, index, row))
    problems += duplicate_ids(checked)
    bad = {(p['file'], p['row']) for p in problems}
    rows = [r for r, (_, index, _) in zip(rows, checked) if (path, index) not in bad]
    return rows, problems


def normalize_answer(text: Optional[str]) -> str:
    """Lower-cased, with surrounding whitespace and punctuation stripped."""
    return (text or '').lower().strip(string.punctuation + string.whitespace)
