"""Up-front validation of LLaVA data: every problem a training run would skip,
found before the run, with the row it is in."""
import os.path as osp
from typing import List, Sequence

from dpa.datasets.llava import (BadSampleError, bad_row_record, check_image_tags,
                                duplicate_ids, open_image, read_rows, validate_row)
from dpa.models.builders import llm_config
from dpa.models.export import tokenizer_round_trip_problems


def check_files(data_files: Sequence[str], image_folder: str) -> List[dict]:
    """Problems of LLaVA json/jsonl files that need no tokenizer: invalid json,
    missing or broken images, the schema of every field (see
    :func:`~dpa.datasets.llava.validate_row`), ``<image>`` tags, duplicate ids."""
    problems, rows = [], []
    for path in data_files:
        try:
            rows += [(path, index, row) for index, row in read_rows(path, problems)]
        except (OSError, ValueError) as err:
            problems.append(dict(file=path, row=None, id=None, reason='unreadable_file',
                                 detail=str(err)))
    for source, index, row in rows:
        try:
            messages, image = validate_row(row)
            check_image_tags(image, messages)
            if image is not None:
                open_image(osp.join(image_folder, image))
        except BadSampleError as err:
            problems.append(bad_row_record(source, index, row, err))
    return problems + duplicate_ids(rows)


def check_dataset(dataset) -> List[dict]:
    """Every row of an ``LLaVADataset`` that training would skip (tokenised with
    the stage's template, tokenizer and ``max_length``; duplicate ids too)."""
    problems = list(dataset.load_problems)
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        try:
            dataset.prepare_data(index)
        except BadSampleError as err:
            problems.append(bad_row_record(info['source'], info['row_index'], info['row'], err))
    return problems


def tokenizer_round_trip(llm: dict, tokenizer: dict, datasets, rows: int = 8) -> List[dict]:
    """Problems (reason ``tokenizer_round_trip``) if the tokenizer, saved as
    the final model saves it beside the LLM's config and loaded back, gives
    other ids than training on the text of the first ``rows`` rows of each
    dataset (see :func:`dpa.models.export.tokenizer_round_trip_problems`).

    Args:
        llm / tokenizer: the configs of the LLM and its tokenizer.
        datasets: the stages' datasets (their tokenizer and rows are used).
    """
    texts = []
    for dataset in datasets:
        for index in range(min(len(dataset), rows)):
            row = dataset.get_data_info(index)['row']
            turns = row.get('conversations') if isinstance(row, dict) else None
            texts += [turn['value'] for turn in (turns if isinstance(turns, list) else [])
                      if isinstance(turn, dict) and isinstance(turn.get('value'), str)]
    if not datasets:
        return []
    text_config = llm_config(llm)
    name = tokenizer.get('pretrained') or tokenizer.get('type')
    return [dict(file=name, row=None, id=None, reason='tokenizer_round_trip', detail=detail)
            for detail in tokenizer_round_trip_problems(datasets[0].tokenizer, texts,
                                                        text_config)]
