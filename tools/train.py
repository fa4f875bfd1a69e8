"""Run a DPA config: every stage in order, or one with --stage.

    python tools/train.py configs/dpa_tiny.py
    python tools/train.py CONFIG --stage align --work-dir work_dirs/exp1
    python tools/train.py CONFIG --resume        # continue an interrupted stage
    python tools/train.py CONFIG --dry-run       # check it and print the plan, load nothing

Exit status: 0 done, 1 a config, data or work-dir problem (the message names it),
stale stages (the command that re-runs them printed) or a full disk (the resume
command printed), 128 + N stopped by signal N after saving a checkpoint (resume
command printed).
"""
import argparse
import os.path as osp
import shlex
import signal
import sys

from mmengine.dist import is_main_process

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from dpa.artifacts import ArtifactError, manifest_path  # noqa: E402
from dpa.engine.checkpoint import latest_complete_checkpoint  # noqa: E402
from dpa.datasets.llava import AllRowsBad  # noqa: E402
from dpa.engine.config_file import add_cfg_options, load_config  # noqa: E402
from dpa.engine.config_guard import apply_cfg_options  # noqa: E402
from dpa.engine.distributed import exit_distributed_run  # noqa: E402
from dpa.engine.dry_run import dry_run  # noqa: E402
from dpa.engine.checkpoint import UnsafeCheckpointError  # noqa: E402
from dpa.engine.hooks import TooManyBadSamples, TooManyNonFiniteSteps  # noqa: E402
from dpa.engine.interrupts import TrainingInterrupted  # noqa: E402
from dpa.engine.optim import NonFiniteLossError  # noqa: E402
from dpa.engine.pipeline import run_pipeline  # noqa: E402
from dpa.engine.stage_config import STAGES  # noqa: E402
from dpa.engine.summary import format_summary  # noqa: E402
from dpa.errors import ConfigError  # noqa: E402
from dpa.errors import disk_full  # noqa: E402
from dpa.engine.staleness import StaleStagesError  # noqa: E402
from dpa.engine.workdir import WorkDirError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a multimodal LLM with DPA')
    parser.add_argument('config', help='config file')
    parser.add_argument('--stage', choices=STAGES, help='run only this stage')
    parser.add_argument('--work-dir', help='where stages write checkpoints, logs and artifacts '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--resume', action='store_true',
                        help="continue an interrupted stage from its work dir's newest intact "
                        'checkpoint (an error when there is none); refused when the config '
                        'changed since the stage started')
    parser.add_argument('--allow-config-change', action='store_true',
                        help='with --resume: resume even though the config changed (the '
                        "stage's manifest records the change)")
    parser.add_argument('--rerun-stale', action='store_true',
                        help='train again the finished stages made from an earlier artifact '
                        'that has changed since (their folders are moved aside); without it '
                        'such stages are refused')
    add_cfg_options(parser)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher for distributed runs')
    parser.add_argument('--dry-run', action='store_true',
                        help='resolve and check the config, print the plan of each stage '
                        '(data, iterations, batch arithmetic, what trains, the artifact) and '
                        'exit without loading a model')
    parser.add_argument('--verbose', action='store_true',
                        help="print mmengine's records (environment, config, hooks, every "
                        "logging interval) on the console, not only in each stage's log file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.allow_config_change and not args.resume:
        sys.exit('--allow-config-change only applies with --resume')
    try:
        cfg = load_config(args.config)
        apply_cfg_options(cfg, args.cfg_options)
    except ConfigError as err:
        sys.exit(f'config error: {err}')
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    try:
        if args.dry_run:
            print(dry_run(cfg, stage=args.stage))
            return
        manifests = run_pipeline(cfg, stage=args.stage, resume=args.resume,
                                 allow_config_change=args.allow_config_change,
                                 verbose=args.verbose, rerun_stale=args.rerun_stale)
    except ConfigError as err:
        sys.exit(f'config error: {err}')
    except ArtifactError as err:
        sys.exit(f'error: {err.explain(args.config)}')
    except StaleStagesError as err:
        sys.exit(f'error: {err.explain(shlex.join(["python", "tools/train.py", args.config]))}')
    except (WorkDirError, UnsafeCheckpointError) as err:
        sys.exit(f'error: {err}')
    except (NonFiniteLossError, TooManyBadSamples, TooManyNonFiniteSteps, AllRowsBad) as err:
        sys.exit(f'training stopped: {err}')
    except TrainingInterrupted as err:
        print(f'{err}\nresume with:\n  {resume_command(argv, cfg.work_dir)}', file=sys.stderr)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without a checkpoint of this step
        print('stopped at once by a second Ctrl-C (every file written is complete; the steps '
              f'since the last checkpoint are lost); continue with:\n  '
              f'{restart_command(argv, cfg.work_dir)}', file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as err:  # noqa: BLE001 - only a full disk is turned into a message
        if not disk_full(err):
            raise
        sys.exit(f'error: no space left on the disk of {cfg.work_dir} ({err}). Nothing '
                 'half-written is kept: free space, then run\n  '
                 f'{restart_command(argv, cfg.work_dir)}')
    if is_main_process():  # one summary per run, not one per process
        print(format_summary(manifests))
    exit_distributed_run()


def restart_command(argv, work_dir: str) -> str:
    """After a failure: the command that resumes when an unfinished stage has
    a checkpoint, else the same command again."""
    resumable = any(latest_complete_checkpoint(osp.join(work_dir, stage))
                    and not osp.exists(manifest_path(work_dir, stage)) for stage in STAGES)
    if resumable:
        return resume_command(argv, work_dir)
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(['python', 'tools/train.py'] + args
                      + ([] if '--work-dir' in args else ['--work-dir', work_dir]))


def resume_command(argv, work_dir: str) -> str:
    """The command line that continues this run where it stopped."""
    args = list(sys.argv[1:] if argv is None else argv)
    if '--work-dir' not in args:
        args += ['--work-dir', work_dir]
    if '--resume' not in args:
        args.append('--resume')
    return shlex.join(['python', 'tools/train.py'] + args)


if __name__ == '__main__':
    main()
