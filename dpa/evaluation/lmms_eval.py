"""Run lmms-eval's ``llava_hf`` model on a model's transformers LLaVA export.

lmms-eval lives in its own environment (``requirements/eval.txt``: its pins
clash with nothing here but pull heavy dependencies), so it runs as a
subprocess, ``python -m lmms_eval``, with that environment's python. The
project's local tasks (``lmms_eval_tasks/``; today ``dpa_synthetic``) are
copied to the output directory with their data file filled in (the rows
being evaluated, image paths made absolute) and passed with
``--include_path``. Measured with lmms-eval 0.7.3 on transformers 5: its
``llava_hf`` model runs generation tasks; its loglikelihood (multiple-choice)
path fails on transformers-5 LLaVA processors, so the local task generates.
"""
import glob
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence

TASKS_DIR = osp.join(osp.dirname(osp.abspath(__file__)), 'lmms_eval_tasks')
DATA_PLACEHOLDER = '__DATA_FILES__'
PYTHON_ENV = 'LMMS_EVAL_PYTHON'


class LmmsEvalError(RuntimeError):
    """lmms-eval could not run or wrote no results."""


def local_tasks() -> List[str]:
    """The tasks shipped with the project."""
    return sorted(name for name in os.listdir(TASKS_DIR)
                  if osp.isfile(osp.join(TASKS_DIR, name, f'{name}.yaml')))


def hf_llava_dir(model_dir: str) -> str:
    """The transformers LLaVA export of a model directory (itself, or the
    ``hf_llava`` folder of a native one)."""
    if osp.isfile(osp.join(model_dir, 'config.json')):
        return model_dir
    export = osp.join(model_dir, 'hf_llava')
    if osp.isfile(osp.join(export, 'config.json')):
        return export
    raise LmmsEvalError(f'{model_dir} has no hf_llava export (the final stage writes one for '
                        'transformers-native LLMs with the mlp2x_gelu projector; see its '
                        "manifest's notes): lmms-eval's llava_hf model needs it")


def write_local_tasks(tasks: Sequence[str], rows: List[dict], out_dir: str) -> str:
    """Copy the local ``tasks`` to ``out_dir/tasks`` with their data: ``rows``
    as jsonl, images as absolute paths. Returns the include path."""
    include = osp.join(out_dir, 'tasks')
    os.makedirs(include, exist_ok=True)
    data = osp.join(out_dir, 'data.jsonl')
    with open(data, 'w') as f:
        for row in rows:
            image = osp.abspath(row['image_path']) if row['image_path'] else None
            f.write(json.dumps(dict(id=str(row['id']), image=image, question=row['question'],
                                    answer=row['answer'], options=row['options'],
                                    type=row['type'])) + '\n')
    for task in tasks:
        target = osp.join(include, task)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(osp.join(TASKS_DIR, task), target,
                        ignore=shutil.ignore_patterns('__pycache__'))
        yaml_path = osp.join(target, f'{task}.yaml')
        with open(yaml_path) as f:
            text = f.read()
        with open(yaml_path, 'w') as f:
            f.write(text.replace(DATA_PLACEHOLDER, json.dumps(osp.abspath(data))))
    return include


def lmms_eval_command(python: str, hf_dir: str, tasks: Sequence[str], output_path: str,
                      include_path: Optional[str] = None, device: str = 'cpu') -> List[str]:
    # device_map is required by llava_hf (measured: without it the model stays unplaced).
    command = [python, '-m', 'lmms_eval', '--model', 'llava_hf',
               '--model_args', f'pretrained={osp.abspath(hf_dir)},device_map={device}',
               '--tasks', ','.join(tasks), '--batch_size', '1', '--device', device,
               '--output_path', output_path]
    if include_path:
        command += ['--include_path', include_path]
    return command


def read_results(output_path: str) -> dict:
    """``{task: {metric: value}}`` from the newest results file lmms-eval
    wrote under ``output_path`` (the default ``,none`` filter name dropped)."""
    files = glob.glob(osp.join(output_path, '**', '*results*.json'), recursive=True)
    if not files:
        raise LmmsEvalError(f'lmms-eval wrote no results file under {output_path}')
    with open(max(files, key=osp.getmtime)) as f:
        results = json.load(f)['results']
    return {task: {key.replace(',none', ''): value for key, value in metrics.items()
                   if key != 'alias'}
            for task, metrics in results.items()}


def run_lmms_eval(model_dir: str, tasks: Sequence[str], rows: List[dict], out_dir: str,
                  python: Optional[str] = None, device: str = 'cpu') -> dict:
    """Run lmms-eval on the export of ``model_dir``; return what metrics.json records.

    Args:
        model_dir: a native or ``hf_llava`` model directory.
        tasks: lmms-eval task names; local ones (:func:`local_tasks`) read ``rows``.
        rows: the checked evaluation rows (see :mod:`dpa.evaluation.data`).
        out_dir: lmms-eval's output goes to ``out_dir/lmms_eval``.
        python: the interpreter of the lmms-eval environment (default: the
            ``LMMS_EVAL_PYTHON`` environment variable, else this one).
        device: ``cpu``, ``cuda``, ``cuda:0``, ...
    """
    python = python or os.environ.get(PYTHON_ENV) or sys.executable
    work = osp.abspath(osp.join(out_dir, 'lmms_eval'))
    os.makedirs(work, exist_ok=True)
    local = [t for t in tasks if t in local_tasks()]
    include = write_local_tasks(local, rows, work) if local else None
    output_path = osp.join(work, 'output')
    command = lmms_eval_command(python, hf_llava_dir(model_dir), tasks, output_path, include,
                                device)
    probe = subprocess.run([python, '-c', 'import lmms_eval'], capture_output=True, text=True)
    if probe.returncode != 0:
        raise LmmsEvalError(f'{python} cannot import lmms_eval: install it in a separate '
                            'environment (pip install -r requirements/eval.txt, see README '
                            f'"Evaluate") and pass its python with --lmms-eval-python or '
                            f'{PYTHON_ENV}')
    log = osp.join(work, 'lmms_eval.log')
    with open(log, 'w') as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise LmmsEvalError(f'lmms-eval exited with {result.returncode} (log: {log}):\n{tail}')
    return dict(tasks=list(tasks), results=read_results(output_path), command=command, log=log)
