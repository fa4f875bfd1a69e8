"""Language-prior-conflict diagnostic of a config's caption data, before
training: caption NLL under the base LLM (and the proxy, once stage 1 ran) and
the share of caption tokens the base LLM finds unlikely, per caption source.

    python tools/analyze_prior.py CONFIG [--work-dir DIR] [--num 200] [--out prior.json]
"""
import argparse
import copy
import json
import os
import os.path as osp
import sys


sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import dpa  # noqa: E402,F401
from dpa.analysis.commands import load_run_config, resolve_config  # noqa: E402
from dpa.analysis.prior import diagnose_prior, format_prior_table  # noqa: E402
from dpa.artifacts import ArtifactError  # noqa: E402
from dpa.engine.config_file import add_cfg_options  # noqa: E402
from dpa.errors import ConfigError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Language-prior-conflict diagnostic')
    parser.add_argument('config')
    parser.add_argument('--work-dir', help='the run\'s work dir (for the proxy column; '
                        'default work_dirs/<config name>)')
    parser.add_argument('--num', type=int, default=200, help='caption rows per source')
    parser.add_argument('--out', help='write the result as JSON here '
                        '(default: <work dir>/prior_diagnostic.json)')
    add_cfg_options(parser)
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f'--num must be at least 1, got {args.num}')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.cfg_options, args.work_dir)
        result = diagnose_prior(resolve_config(copy.deepcopy(cfg)), args.num)
    except ConfigError as err:
        sys.exit(f'config error: {err}')
    except ArtifactError as err:
        sys.exit(f'error: {err.explain(args.config)}')
    print(format_prior_table(result))
    out = args.out or osp.join(cfg.work_dir, 'prior_diagnostic.json')
    if osp.dirname(out):
        os.makedirs(osp.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'written to {out}')


if __name__ == '__main__':
    main()
