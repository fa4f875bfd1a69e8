"""Which target words does the image explain? Per-token p(y|image, text),
p(y|text) and the weight of the stage's loss, as records, HTML and plots.

    python tools/analyze_relevance.py CONFIG --stage align --num 20 --out relevance/
    python tools/analyze_relevance.py CONFIG --stage align --model base proxy --num 50 \\
        --out relevance/   # how PMO moves the weights
    python tools/analyze_relevance.py CONFIG --stage finetune --model trained \\
        --data eval.jsonl --image-folder images/ --num 10 --out relevance/
"""
import argparse
import os.path as osp
import sys


sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import dpa  # noqa: E402,F401
from dpa.analysis.commands import analyze_relevance, load_run_config  # noqa: E402
from dpa.analysis.models import MODEL_CHOICES  # noqa: E402
from dpa.artifacts import ArtifactError  # noqa: E402
from dpa.engine.config_file import add_cfg_options  # noqa: E402
from dpa.errors import ConfigError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Word-level visual relevance of a DPA stage')
    parser.add_argument('config')
    parser.add_argument('--work-dir', help='the run\'s work dir (as in tools/train.py; '
                        'default work_dirs/<config name>)')
    parser.add_argument('--stage', required=True, choices=('align', 'finetune'))
    parser.add_argument('--model', nargs='+', default=['trained'], choices=MODEL_CHOICES,
                        help='which LLM: base, proxy (base + stage-1 adapter) or trained (the '
                        "stage's); two values compare them on the same tokens")
    parser.add_argument('--data', help='a LLaVA json/jsonl file (default: the stage\'s data)')
    parser.add_argument('--image-folder', help='folder of --data\'s images')
    parser.add_argument('--num', type=int, default=20, help='rows to analyse')
    parser.add_argument('--out', required=True, help='output folder')
    add_cfg_options(parser)
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f'--num must be at least 1, got {args.num}')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.cfg_options, args.work_dir)
        result = analyze_relevance(cfg, args.stage, args.model, args.num, args.out,
                                   args.data, args.image_folder)
    except (ConfigError, ValueError) as err:
        sys.exit(f'error: {err}')
    except ArtifactError as err:
        sys.exit(f'error: {err.explain(args.config)}')
    print(f"{result['samples']} rows of stage {args.stage}, loss {result['loss']['mode']} "
          f"clamp {result['loss']['clamp']}")
    for name, stats in result['models'].items():
        print(f"  {name:<8} {stats['tokens']} tokens, mean weight {stats['weight_mean']:.3f}, "
              f"at delta_min {stats['at_min']:.1%}, at delta_max {stats['at_max']:.1%}, "
              f"mean p_img - p_txt {stats['delta_mean']:+.4f}")
        print(f"           {stats['description']}")
    if result['skipped_rows']:
        print(f"  skipped {len(result['skipped_rows'])} bad rows (listed in summary.json)")
    if 'note' in result:
        print(f"  note: {result['note']}")
    print(f"written to {args.out}: {', '.join(result['files'])}")


if __name__ == '__main__':
    main()
