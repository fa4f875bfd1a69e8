"""Up-front validation of LLaVA data: every problem a training run would skip,
found before the run, with the row it is in."""
import os.path as osp
from typing import Iterable, List, Sequence

from dpa.datasets.llava import (BadSampleError, bad_row_record, check_image_tags,
                                conversation_messages, open_image, read_rows)


def duplicate_ids(rows: Iterable[tuple]) -> List[dict]:
    """Records for every row whose ``id`` an earlier row already has.

    Args:
        rows: (file, row index, row) triples, in reading order.
    """
    first_seen, problems = {}, []
    for source, index, row in rows:
        row_id = row.get('id') if isinstance(row, dict) else None
        if row_id is None:
            continue
        if row_id in first_seen:
            where = first_seen[row_id]
            err = BadSampleError('duplicate_id', f'id {row_id!r} is also at {where[0]} row '
                                 f'{where[1]}')
            problems.append(bad_row_record(source, index, row, err))
        else:
            first_seen[row_id] = (source, index)
    return problems


def check_files(data_files: Sequence[str], image_folder: str) -> List[dict]:
    """Problems of LLaVA json/jsonl files that need no tokenizer: invalid json,
    missing or broken images, conversations, roles, ``<image>`` tags, empty
    answers, duplicate ids."""
    problems, rows = [], []
    for path in data_files:
        rows += [(path, index, row) for index, row in read_rows(path, problems)]
    for source, index, row in rows:
        try:
            messages = conversation_messages(row)
            check_image_tags(row, messages)
            if 'image' in row:
                open_image(osp.join(image_folder, row['image']))
        except BadSampleError as err:
            problems.append(bad_row_record(source, index, row, err))
    return problems + duplicate_ids(rows)


def check_dataset(dataset) -> List[dict]:
    """Every row of an ``LLaVADataset`` that training would skip (tokenised with
    the stage's template, tokenizer and ``max_length``), and duplicate ids."""
    problems = list(dataset.load_problems)
    rows = []
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        rows.append((info['source'], info['row_index'], info['row']))
        try:
            dataset.prepare_data(index)
        except BadSampleError as err:
            problems.append(bad_row_record(info['source'], info['row_index'], info['row'], err))
    return problems + duplicate_ids(rows)
