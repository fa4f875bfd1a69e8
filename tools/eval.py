"""Score a trained model on evaluation rows.

    python tools/eval.py WORK_DIR_OR_MODEL_DIR --data FILE.jsonl [--image-folder DIR]
        [--out DIR] [--batch-size N] [--device cpu|cuda|cuda:1] [--skip-bad-rows]
        [--lmms-eval TASKS [--lmms-eval-model auto|llava_hf|dpa] [--lmms-eval-python PYTHON]]
        [--no-verify]

WORK_DIR_OR_MODEL_DIR is a finished work dir (its final model), a native model
dir (``dpa_model.json``) or an ``hf_llava`` export. Rows are
``{"id", "image", "question", "answer", "options", "type"}`` (image, options
and type optional). Writes metrics.json and predictions.jsonl to --out
(default: WORK_DIR_OR_MODEL_DIR/evaluation/<data file name>, with the hash of
the data file's path appended when that folder holds another file's results)
and prints a table. The model's files are first checked against the sha256 its manifest
recorded (--no-verify skips that). --lmms-eval also runs lmms-eval
(dpa.evaluation.lmms_eval) and records its scores and, for the local tasks,
its per-row agreement with the built-in evaluator. Exits 1 when the model or
the data cannot be read, the data has bad rows (listed in bad_rows.jsonl;
--skip-bad-rows scores the others), --out is not writable or lmms-eval fails
(no score printed), 2 on a usage error.
"""
import argparse
import hashlib
import json
import os
import os.path as osp
import sys
import tempfile

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import dpa  # noqa: E402,F401
from dpa.evaluation import (BadRowsError, EvalDataError, ModelLoadError, evaluate,  # noqa: E402
                            format_table, read_eval_rows)
from dpa.evaluation.evaluator import (METRICS_FILE, read_predictions,  # noqa: E402
                                      write_metrics)
from dpa.errors import disk_full  # noqa: E402
from dpa.evaluation.lmms_eval import (LMMS_EVAL_MODELS, LmmsEvalError,  # noqa: E402
                                      LmmsEvalInterrupted, disagreement_warnings,
                                      lmms_eval_python, run_lmms_eval)
from dpa.evaluation.models import check_device, default_device, resolve_model_dir  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Evaluate a trained multimodal LLM')
    parser.add_argument('model', help='work dir, native model dir or hf_llava dir')
    parser.add_argument('--data', required=True, help='json/jsonl evaluation rows')
    parser.add_argument('--image-folder', default='',
                        help="folder the rows' image paths are relative to")
    parser.add_argument('--out', help='output folder (default: MODEL/evaluation/DATA_NAME)')
    parser.add_argument('--batch-size', type=int, default=8,
                        help='options (or open questions) per forward pass; a row\'s prompt '
                        'runs once, its options continue from its keys and values')
    parser.add_argument('--device', help='cpu, cuda, cuda:1, ... (default: cuda if available)')
    parser.add_argument('--skip-bad-rows', action='store_true',
                        help='score the good rows when some are bad (they are still listed)')
    parser.add_argument('--pad-to-square', action=argparse.BooleanOptionalAction, default=None,
                        help='native models: override the recorded image preprocessing')
    parser.add_argument('--lmms-eval', metavar='TASKS',
                        help='also run these lmms-eval tasks (comma-separated; dpa_synthetic '
                        'and dpa_synthetic_mc read the open and multiple-choice rows of --data)')
    parser.add_argument('--lmms-eval-model', choices=LMMS_EVAL_MODELS, default='auto',
                        help="lmms-eval's llava_hf on the hf_llava export, or the project's dpa "
                        'model (any model, multiple choice too); auto: llava_hf where there is '
                        'an export')
    parser.add_argument('--lmms-eval-python',
                        help='python of the lmms-eval environment (default: $LMMS_EVAL_PYTHON, '
                        'else this one)')
    parser.add_argument('--skip-no-image', action='store_true',
                        help='do not ask the questions again without their pictures (the '
                        '"no image" control column, on by default)')
    parser.add_argument('--no-verify', action='store_true',
                        help="load the model without checking its files against its "
                        "manifest's sha256 (for very large checkpoints you trust)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1:
        sys.exit(f'--batch-size must be at least 1, got {args.batch_size}')
    out = args.out or default_out(args.model, args.data)
    try:
        device = check_device(args.device or default_device())
        python = lmms_eval_python(args.lmms_eval_python) if args.lmms_eval else None
        check_writable(out)
        metrics = evaluate(args.model, args.data, args.image_folder, out, args.batch_size,
                           device, args.skip_bad_rows, args.pad_to_square,
                           verify=not args.no_verify, no_image_control=not args.skip_no_image)
        if args.lmms_eval:
            rows, _ = read_eval_rows(args.data, args.image_folder)
            tasks = [t for t in args.lmms_eval.split(',') if t]
            metrics['lmms_eval'] = run_lmms_eval(
                resolve_model_dir(args.model, verify=False), tasks, rows, out, python, device,
                args.lmms_eval_model, read_predictions(out), args.batch_size)
            write_metrics(metrics, out)
            for line in disagreement_warnings(metrics['lmms_eval']):
                print(line, file=sys.stderr)
    except LmmsEvalInterrupted as err:
        print(f'eval stopped: {err}', file=sys.stderr)
        sys.exit(128 + err.signum)
    except (EvalDataError, BadRowsError, ModelLoadError, LmmsEvalError) as err:
        sys.exit(f'eval error: {err}')
    except Exception as err:  # noqa: BLE001 - only a full disk is turned into a message
        if not disk_full(err):
            raise
        sys.exit(f'eval error: no space left on the disk of {out} ({err}): free space or pass '
                 '--out with a folder on another disk, then run it again')
    print(format_table(metrics))
    print(f'metrics: {osp.join(out, "metrics.json")}')


def default_out(model: str, data: str) -> str:
    """MODEL/evaluation/<data file name>, unless that folder holds the results
    of another data file of the same name (``test.jsonl`` of two benchmarks):
    then MODEL/evaluation/<name>-<8 hex digits of the data file's path>, so
    neither overwrites the other. (Not MODEL/eval: in a work dir that is the
    eval stage's folder.)"""
    name = osp.splitext(osp.basename(data))[0]
    out = osp.join(model, 'evaluation', name)
    try:
        with open(osp.join(out, METRICS_FILE)) as f:
            scored = json.load(f).get('data')
    except (OSError, ValueError, AttributeError):
        return out
    if scored is None or scored == osp.abspath(data):
        return out
    digest = hashlib.sha256(osp.abspath(data).encode()).hexdigest()[:8]
    return osp.join(model, 'evaluation', f'{name}-{digest}')


def check_writable(out: str) -> None:
    """Fail before the model loads when the results could not be written."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise EvalDataError(f'cannot write the results to {out} ({err.strerror}): pass --out '
                            'with a writable folder') from None


if __name__ == '__main__':
    main()
