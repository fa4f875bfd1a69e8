"""Validate LLaVA-format data before training.

    python tools/check_data.py CONFIG [--report problems.jsonl]
        every dataset of every stage of CONFIG, tokenised as training would
    python tools/check_data.py FILE [FILE ...] --image-folder DIR [--report PATH]
        json/jsonl files on their own (no tokenizer: no length check)

Prints the count of each problem with example rows, writes every problem as a
JSON line (file, row, id, reason, detail; stage in CONFIG mode) to --report,
and exits 1 when it found any.
"""
import argparse
import json
import os
import os.path as osp
import sys
from collections import defaultdict

from mmengine.config import Config

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import dpa  # noqa: E402,F401
from dpa.datasets.llava import read_rows  # noqa: E402
from dpa.datasets.mixture import as_list, data_sources  # noqa: E402
from dpa.datasets.validation import (check_dataset, check_files,  # noqa: E402
                                     tokenizer_round_trip)
from dpa.engine.config_file import add_cfg_options, load_config  # noqa: E402
from dpa.engine.config_guard import apply_cfg_options  # noqa: E402
from dpa.engine.pipeline import prepare_synthetic_data  # noqa: E402
from dpa.engine.preflight import prepare_config  # noqa: E402
from dpa.engine.stage_config import stage_dataset_config  # noqa: E402
from dpa.errors import ConfigError  # noqa: E402
from dpa.registry import DATASETS  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Validate LLaVA-format data')
    parser.add_argument('inputs', nargs='+', help='a config file, or json/jsonl data files')
    parser.add_argument('--image-folder', default='',
                        help='folder the rows\' image paths are relative to (file mode)')
    parser.add_argument('--report', help='write every problem here as JSON lines')
    add_cfg_options(parser, help='override config keys (config mode)')
    return parser.parse_args(argv)


def check_config_data(cfg: Config, stages):
    """The problems of the data ``stages`` of a prepared config read
    (:func:`dpa.engine.preflight.prepare_config`: path variables filled in,
    tiny stand-ins made)."""
    prepare_synthetic_data(cfg)
    problems, datasets = [], []
    for stage in stages:
        unreadable = unreadable_files(cfg[cfg[stage].data])
        if unreadable:  # the stage's dataset cannot be built: report, go on
            problems += [dict(record, stage=stage) for record in unreadable]
            continue
        datasets.append(DATASETS.build(stage_dataset_config(cfg, stage)))
        problems += [dict(record, stage=stage) for record in check_dataset(datasets[-1])]
    return problems + tokenizer_round_trip(cfg.llm, cfg.tokenizer, datasets)


def unreadable_files(data) -> list:
    """An ``unreadable_file`` problem for each data file that is missing or
    is not a json list / jsonl file."""
    problems = []
    for source in data_sources(data).values():
        for path in as_list(source.data_files):
            try:
                read_rows(path, [])
            except FileNotFoundError:
                detail = (f'{path} does not exist (a relative path is relative to the current '
                          f'directory, {os.getcwd()})')
            except (OSError, ValueError) as err:
                detail = str(err)
            else:
                continue
            problems.append(dict(file=path, row=None, id=None, reason='unreadable_file',
                                 detail=detail))
    return problems


def summarise(problems) -> str:
    by_reason = defaultdict(list)
    for record in problems:
        by_reason[record['reason']].append(record)
    lines = [f'{len(problems)} problem(s)' if problems else 'no problems found']
    for reason, records in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        examples = ', '.join(f"{osp.basename(r['file'])}:{r['row']}"
                             + (f" (id {r['id']})" if r['id'] is not None else '')
                             if r['row'] is not None else r['detail']  # a whole file
                             for r in records[:3])
        lines.append(f'  {reason:<20} {len(records):>7}  e.g. {examples}')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if len(args.inputs) == 1 and args.inputs[0].endswith('.py'):
        if args.image_folder:
            sys.exit('--image-folder applies to data files; in config mode set '
                     '--cfg-options caption_data.image_folder=DIR (or instruct_data.)')
        try:
            cfg = load_config(args.inputs[0])
            apply_cfg_options(cfg, args.cfg_options)
            # As the run reads it: stand-ins and data of tiny_standin, {data_root} filled.
            cfg, stages = prepare_config(cfg)
        except ConfigError as err:
            sys.exit(f'config error: {err}')
        problems = check_config_data(cfg, stages)
    else:
        if args.cfg_options:
            sys.exit('--cfg-options applies to a config file; data files take --image-folder')
        problems = check_files(args.inputs, args.image_folder)
    print(summarise(problems))
    if args.report:
        with open(args.report, 'w') as f:
            f.writelines(json.dumps(record) + '\n' for record in problems)
        print(f'report: {args.report}')
    sys.exit(1 if problems else 0)


if __name__ == '__main__':
    main()
