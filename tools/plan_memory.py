"""Estimated memory per GPU of each stage of a config, under its strategy.

    python tools/plan_memory.py CONFIG --gpus 8 --gpu-memory 80 [--cfg-options k=v ...]

Prints, per stage, the weights, gradients, optimizer states and activations
(at the stage's per-device batch and length, with and without activation
checkpointing) in GB per GPU, and whether the stage fits; exits 1 when one
does not. Reads the checkpoints' config.json when they are on this machine,
else published sizes (dpa/engine/memory_plan.py). No weights are loaded.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import dpa  # noqa: E402,F401
from dpa.engine.config_file import (add_cfg_options, load_config, positive_int,  # noqa: E402
                                    positive_number)
from dpa.engine.config_guard import apply_cfg_options  # noqa: E402
from dpa.engine.memory_plan import GB, HEADROOM, format_plan, plan  # noqa: E402
from dpa.engine.paths import fill_path_variables  # noqa: E402
from dpa.engine.preflight import selected_stages  # noqa: E402
from dpa.engine.stage_config import stage_trainable  # noqa: E402
from dpa.errors import ConfigError  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--gpus', type=positive_int, required=True,
                        help='processes, one per GPU')
    parser.add_argument('--gpu-memory', type=positive_number, required=True,
                        help='GB per GPU')
    add_cfg_options(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        apply_cfg_options(cfg, args.cfg_options)
        fill_path_variables(cfg)
        stages = selected_stages(cfg)
    except ConfigError as err:
        sys.exit(f'config error: {err}')
    trainable = {stage: stage_trainable(cfg, stage) for stage in stages}
    plans = plan(cfg, args.gpus, trainable)
    print(f'{args.config}: GB per GPU (estimate, dpa/engine/memory_plan.py)')
    print(format_plan(plans, args.gpus, args.gpu_memory))
    return 0 if all(p['total'] / GB <= args.gpu_memory * HEADROOM for p in plans.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
