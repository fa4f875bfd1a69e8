"""Run lmms-eval on a trained model and check its answers against the built-in
evaluator's.

lmms-eval lives in its own environment (``requirements/eval.txt``: its pins
clash with nothing here but pull heavy dependencies), so it runs as a
subprocess, ``python -m lmms_eval``, with that environment's python. Two
lmms-eval models score a model:

- ``llava_hf`` (lmms-eval's own) on the transformers LLaVA export
  (``hf_llava/``). Measured with lmms-eval 0.7.3 on transformers 5: it runs
  generation tasks; its loglikelihood (multiple-choice) path fails.
- ``dpa`` (the project's, :mod:`dpa.evaluation.lmms_eval_model`, registered
  through setup.cfg's entry point: the project must be installed in that
  environment) on any model ``tools/eval.py`` scores, with the built-in
  evaluator's prompts and scoring, generation and loglikelihood.

``auto`` takes ``llava_hf`` where there is an export, ``dpa`` otherwise
(InternLM2, other projectors).

The project's local tasks (``lmms_eval_tasks/``) read the rows being
evaluated: ``dpa_synthetic`` the open questions (generation, normalised exact
match), ``dpa_synthetic_mc`` the multiple-choice rows (loglikelihood). Each
run writes to a fresh directory, keeps lmms-eval's per-row answers
(``--log_samples``) and is trusted only if lmms-eval exited 0, logged no
error and wrote results for every task (lmms-eval 0.7.3 exits 0 on an unknown
task or a crashed request). For the local tasks, each row's answer is then
compared with the built-in evaluator's (:func:`agreement`).
"""
import glob
import hashlib
import json
import os
import os.path as osp
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from dpa.evaluation.models import load_image

TASKS_DIR = osp.join(osp.dirname(osp.abspath(__file__)), 'lmms_eval_tasks')
DATA_PLACEHOLDER = '__DATA_FILES__'
PYTHON_ENV = 'LMMS_EVAL_PYTHON'
LMMS_EVAL_MODELS = ('auto', 'llava_hf', 'dpa')
# Which rows each local task reads.
LOCAL_TASK_ROWS = {'dpa_synthetic': 'open', 'dpa_synthetic_mc': 'multiple_choice'}
# Lines of lmms-eval's log (loguru's format, colours removed) that mean the run failed.
ERROR_LINE = re.compile(r'\|\s*(ERROR|CRITICAL)\s*\|')
TRACEBACK = 'Traceback (most recent call last):'
ANSI = re.compile(r'\x1b\[[0-9;]*m')
REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


class LmmsEvalError(RuntimeError):
    """lmms-eval could not run, failed, or wrote no results for this run."""


class LmmsEvalInterrupted(LmmsEvalError):
    """A signal stopped the run; lmms-eval got it too and has exited."""

    def __init__(self, signum: int, log: str):
        self.signum = signum
        super().__init__(f'lmms-eval stopped by {signal.Signals(signum).name} (it was passed on '
                         f'to lmms-eval, which has exited; its log: {log}); no score recorded')


def lmms_eval_python(python: Optional[str] = None) -> str:
    """The interpreter of the lmms-eval environment: ``python``, else
    ``$LMMS_EVAL_PYTHON``, else this one; checked before any model loads.

    Raises:
        LmmsEvalError: it is not an executable file, naming where it came from.
    """
    where = '--lmms-eval-python' if python else PYTHON_ENV if os.environ.get(PYTHON_ENV) \
        else None
    python = python or os.environ.get(PYTHON_ENV) or sys.executable
    found = shutil.which(python) if osp.basename(python) == python else python
    if found is None or not osp.isfile(found) or not os.access(found, os.X_OK):
        problem = 'is not an executable file' if found and osp.exists(found) else 'does not exist'
        raise LmmsEvalError(f'{where or "the python"} {python} {problem}: pass the python of the '
                            'environment lmms-eval is installed in (docs/evaluate.md), e.g. '
                            '--lmms-eval-python /envs/lmms-eval/bin/python')
    return found


def run_forwarding_signals(command: Sequence[str], log: str) -> int:
    """Run ``command`` with its output in the file ``log`` and return its
    exit status. SIGTERM and SIGINT are passed on to it and waited for (a
    scheduler's SIGTERM must not leave lmms-eval running on the GPU), then
    :class:`LmmsEvalInterrupted` is raised."""
    with open(log, 'w') as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    received = []

    def forward(signum, frame):
        received.append(signum)
        child.send_signal(signum)

    # Handlers can only be set in the main thread; elsewhere the signal is the main thread's.
    signals = (signal.SIGTERM, signal.SIGINT) \
        if threading.current_thread() is threading.main_thread() else ()
    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child.poll() is None:  # an exception in this process: do not leave it behind
            child.kill()
            child.wait()
    if received:
        raise LmmsEvalInterrupted(received[0], log)
    return returncode


def local_tasks() -> Dict[str, str]:
    """The tasks shipped with the project: name -> its yaml file."""
    return {osp.splitext(osp.basename(path))[0]: path
            for path in sorted(glob.glob(osp.join(TASKS_DIR, '*', '*.yaml')))}


def hf_llava_dir(model_dir: str) -> Optional[str]:
    """The transformers LLaVA export of a model directory (itself, or the
    ``hf_llava`` folder of a native one), None when it has none."""
    for candidate in (model_dir, osp.join(model_dir, 'hf_llava')):
        if osp.isfile(osp.join(candidate, 'config.json')):
            return candidate
    return None


def choose_model(model_dir: str, requested: str = 'auto') -> Tuple[str, str]:
    """``(lmms-eval model, its pretrained path)`` for ``model_dir``."""
    if requested not in LMMS_EVAL_MODELS:
        raise LmmsEvalError(f'the lmms-eval model must be one of {LMMS_EVAL_MODELS}, got '
                            f'{requested!r}')
    export = hf_llava_dir(model_dir)
    if requested == 'dpa' or (requested == 'auto' and export is None):
        return 'dpa', model_dir
    if export is None:
        raise LmmsEvalError(f'{model_dir} has no hf_llava export (the final stage writes one for '
                            'transformers-native LLMs with the mlp2x_gelu projector; see its '
                            "manifest's notes): lmms-eval's llava_hf needs it; the project's "
                            'model scores it: --lmms-eval-model dpa')
    return 'llava_hf', export


def task_rows(task: str, rows: List[dict]) -> List[dict]:
    """The rows a local task reads; a LmmsEvalError when there are none."""
    kind = LOCAL_TASK_ROWS[task]
    chosen = [r for r in rows if (r['options'] is not None) == (kind == 'multiple_choice')]
    if not chosen:
        other = next(t for t, k in LOCAL_TASK_ROWS.items() if k != kind)
        raise LmmsEvalError(f'{task} scores the {kind.replace("_", "-")} rows and the data has '
                            f'none; {other} scores the others')
    return chosen


def task_image(path: str, out_dir: str) -> str:
    """The picture at ``path`` as the project's loader reads it
    (:func:`dpa.evaluation.models.load_image`: 8-bit RGB, 16-bit grey rescaled,
    not clipped to white), written once as an 8-bit RGB PNG under
    ``out_dir/images``: lmms-eval's task opens that with ``convert('RGB')``,
    which leaves it as it is, so lmms-eval scores the picture training and
    the built-in evaluator saw."""
    folder = osp.join(out_dir, 'images')
    os.makedirs(folder, exist_ok=True)
    target = osp.join(folder, hashlib.sha256(osp.abspath(path).encode()).hexdigest()[:16]
                      + '.png')
    if not osp.exists(target):
        load_image(path).save(target + '.tmp.png')
        os.replace(target + '.tmp.png', target)
    return target


def write_local_tasks(tasks: Sequence[str], rows: List[dict], out_dir: str) -> str:
    """Copy the local ``tasks`` to ``out_dir/tasks/<task>/`` with their data
    (``out_dir/<task>.jsonl``: the task's rows, each picture as
    :func:`task_image` wrote it). Returns the include path."""
    include = osp.join(out_dir, 'tasks')
    available = local_tasks()
    for task in tasks:
        chosen = task_rows(task, rows)
        os.makedirs(out_dir, exist_ok=True)
        data = osp.join(out_dir, f'{task}.jsonl')
        with open(data, 'w') as f:
            for row in chosen:
                image = task_image(row['image_path'], out_dir) if row['image_path'] else None
                f.write(json.dumps(dict(id=str(row['id']), image=image, question=row['question'],
                                        answer=row['answer'], options=row['options'],
                                        type=row['type'])) + '\n')
        target = osp.join(include, task)
        os.makedirs(target)
        source = osp.dirname(available[task])
        for helper in glob.glob(osp.join(source, '*.py')):
            shutil.copy(helper, target)
        with open(available[task]) as f:
            text = f.read()
        with open(osp.join(target, f'{task}.yaml'), 'w') as f:
            f.write(text.replace(DATA_PLACEHOLDER, json.dumps(osp.abspath(data))))
    return include


def lmms_eval_command(python: str, model: str, pretrained: str, tasks: Sequence[str],
                      output_path: str, include_path: Optional[str] = None,
                      device: str = 'cpu', batch_size: int = 1) -> List[str]:
    model_args = f'pretrained={osp.abspath(pretrained)}'
    if model == 'llava_hf':
        # Required by llava_hf (measured: without it the model stays unplaced);
        # it asserts a batch size of 1.
        model_args += f',device_map={device}'
        batch_size = 1
    command = [python, '-m', 'lmms_eval', '--model', model, '--model_args', model_args,
               '--tasks', ','.join(tasks), '--batch_size', str(batch_size), '--device', device,
               '--output_path', output_path, '--log_samples']
    if include_path:
        command += ['--include_path', include_path]
    return command


def log_errors(text: str) -> List[str]:
    """The lines of an lmms-eval log that say the run failed: error records,
    and the exception line that ends each traceback."""
    errors, in_traceback = [], False
    for line in (ANSI.sub('', line) for line in text.splitlines()):
        if line.endswith(TRACEBACK):
            in_traceback = True
        elif in_traceback and line.strip() and not line.startswith(' '):
            errors.append(line)
            in_traceback = False
        elif ERROR_LINE.search(line):
            errors.append(line)
    return errors


def read_results(output_path: str, tasks: Sequence[str] = ()) -> dict:
    """``{task: {metric: value}}`` from the results file lmms-eval wrote under
    ``output_path`` (the default ``,none`` filter name dropped); a
    LmmsEvalError when there is none or one of ``tasks`` has no results."""
    files = glob.glob(osp.join(output_path, '**', '*results*.json'), recursive=True)
    if len(files) != 1:
        raise LmmsEvalError(f'lmms-eval wrote {len(files)} results files under {output_path}, '
                            'expected one')
    with open(files[0]) as f:
        written = json.load(f)
    scored = set(written['results']) | set(written.get('groups', {}))
    missing = [t for t in tasks if t not in scored]
    if missing:
        raise LmmsEvalError(f'lmms-eval wrote no results for {missing} ({files[0]})')
    return {task: {key.replace(',none', ''): value for key, value in metrics.items()
                   if key != 'alias'}
            for task, metrics in written['results'].items()}


def read_samples(output_path: str, task: str) -> List[dict]:
    """lmms-eval's per-row records of ``task`` (``--log_samples``), by doc id."""
    files = glob.glob(osp.join(output_path, '**', f'*_samples_{task}.jsonl'), recursive=True)
    if len(files) != 1:
        raise LmmsEvalError(f'lmms-eval wrote {len(files)} sample files for {task} under '
                            f'{output_path}, expected one')
    with open(files[0]) as f:
        return sorted((json.loads(line) for line in f if line.strip()),
                      key=lambda s: s['doc_id'])


def _loss(response) -> float:
    # A multiple-choice response is (loss, is_greedy), possibly in a list.
    while isinstance(response, list) and isinstance(response[0], list):
        response = response[0]
    return float(response[0])


def agreement(task: str, samples: List[dict], rows: List[dict],
              predictions: Dict[str, dict]) -> dict:
    """Per-row agreement of lmms-eval's answers to a local task with the
    built-in evaluator's ``predictions`` (by row id).

    Open questions agree when the answers are the same text; multiple choice
    when the same option is chosen (lmms-eval's smallest loss, the built-in
    evaluator's best score); ``max_score_difference`` is the largest
    difference between an option's summed log-probability in the two.
    """
    if [s['doc_id'] for s in samples] != list(range(len(rows))):
        raise LmmsEvalError(f'{task}: lmms-eval answered docs {[s["doc_id"] for s in samples]}, '
                            f'not the {len(rows)} rows it was given')
    differing, difference = [], 0.0
    for sample, row in zip(samples, rows):
        ours = predictions[str(row['id'])]
        if row['options'] is None:
            answer = sample['filtered_resps']
            answer = answer[0] if isinstance(answer, list) else answer
            same = answer.strip() == ours['prediction'].strip()
        else:
            losses = [_loss(r) for r in sample['filtered_resps']]
            same = row['options'][losses.index(min(losses))] == ours['prediction']
            difference = max([difference] + [abs(-loss - ours['option_scores'][option])
                                             for loss, option in zip(losses, row['options'])])
        if not same:
            differing.append(str(row['id']))
    record = dict(rows=len(rows), agree=len(rows) - len(differing),
                  rate=(len(rows) - len(differing)) / len(rows), differing_ids=differing[:20])
    if LOCAL_TASK_ROWS[task] == 'multiple_choice':
        record['max_score_difference'] = difference
    return record


def disagreement_warnings(record: dict) -> List[str]:
    """One console line per local task whose lmms-eval answers differ from
    the built-in evaluator's on some rows (the same model, data and pictures
    should give the same answers: a difference is a bug to look at)."""
    lines = []
    for task, agree in (record.get('agreement') or {}).items():
        if agree['agree'] < agree['rows']:
            lines.append(f"warning: lmms-eval {task} answered {agree['rows'] - agree['agree']} of "
                         f"{agree['rows']} rows otherwise than the built-in evaluator (ids "
                         f"{', '.join(agree['differing_ids'])}); both read the same model, rows "
                         'and pictures, so this is worth a look')
    return lines


def _probe(python: str, model: str) -> None:
    """Refuse early, with the fix, when ``python`` cannot run ``model``."""
    # find_spec and entry points: nothing heavy is imported.
    script = ('import importlib.util, json; from importlib.metadata import entry_points; '
              'spec = importlib.util.find_spec("dpa"); print(json.dumps(dict('
              'lmms_eval=importlib.util.find_spec("lmms_eval") is not None, '
              'dpa=spec.origin if spec else None, entry=[e.value for e in '
              'entry_points(group="lmms_eval.models") if e.name == "dpa"])))')
    try:
        probe = subprocess.run([python, '-c', script], capture_output=True, text=True)
    except OSError as err:
        raise LmmsEvalError(f'cannot run {python} ({err.strerror}): pass the python of the '
                            'lmms-eval environment with --lmms-eval-python') from None
    found = json.loads(probe.stdout) if probe.returncode == 0 else {}
    if not found.get('lmms_eval'):
        raise LmmsEvalError(f'{python} cannot import lmms_eval: install it in a separate '
                            'environment (docs/evaluate.md) and pass its python with '
                            f'--lmms-eval-python or {PYTHON_ENV}')
    if model != 'dpa':
        return
    ours = osp.join(REPO, 'dpa', '__init__.py')
    if not found['entry'] or found['dpa'] is None or \
            osp.realpath(found['dpa']) != osp.realpath(ours):
        raise LmmsEvalError(f"lmms-eval's dpa model needs this project installed in its "
                            f'environment ({python} imports dpa from {found["dpa"]}, entry point '
                            f'{found["entry"] or "missing"}): {osp.dirname(python)}/pip install '
                            f'-e {REPO}')


def run_lmms_eval(model_dir: str, tasks: Sequence[str], rows: List[dict], out_dir: str,
                  python: Optional[str] = None, device: str = 'cpu', model: str = 'auto',
                  predictions: Optional[List[dict]] = None, batch_size: int = 1) -> dict:
    """Run lmms-eval on ``model_dir``; return what metrics.json records.

    Args:
        model_dir: a native or ``hf_llava`` model directory.
        tasks: lmms-eval task names; local ones (:func:`local_tasks`) read ``rows``.
        rows: the checked evaluation rows (see :mod:`dpa.evaluation.data`).
        out_dir: the run writes to a new directory under ``out_dir/lmms_eval``.
        python: the interpreter of the lmms-eval environment (default: the
            ``LMMS_EVAL_PYTHON`` environment variable, else this one).
        device: ``cpu``, ``cuda``, ``cuda:0``, ...
        model: ``auto``, ``llava_hf`` or ``dpa`` (see the module's docstring).
        predictions: the built-in evaluator's records of ``rows``; with them
            the local tasks' answers are compared row by row.
        batch_size: sequences per forward pass of the ``dpa`` model.

    Raises:
        LmmsEvalError: lmms-eval is missing, failed, or its output is incomplete.
    """
    python = lmms_eval_python(python)
    name, pretrained = choose_model(model_dir, model)
    local = [t for t in tasks if t in local_tasks()]
    _probe(python, name)
    root = osp.abspath(osp.join(out_dir, 'lmms_eval'))
    os.makedirs(root, exist_ok=True)
    # A new directory per run: nothing an earlier run wrote can be read as this one's.
    work = tempfile.mkdtemp(prefix=time.strftime('%Y%m%d_%H%M%S_'), dir=root)
    include = write_local_tasks(local, rows, work) if local else None
    output_path = osp.join(work, 'output')
    command = lmms_eval_command(python, name, pretrained, tasks, output_path, include, device,
                                batch_size)
    log = osp.join(work, 'lmms_eval.log')
    returncode = run_forwarding_signals(command, log)
    with open(log) as f:
        text = f.read()
    errors = log_errors(text)
    if returncode != 0 or errors:
        hint = ''
        choice = any(LOCAL_TASK_ROWS.get(t) == 'multiple_choice' for t in tasks)
        if name == 'llava_hf' and (choice or 'loglikelihood' in text):
            hint = ('\nlmms-eval 0.7.3\'s llava_hf fails on loglikelihood (multiple-choice) '
                    'tasks; the project\'s model scores them: --lmms-eval-model dpa')
        raise LmmsEvalError(f'lmms-eval failed (exit status {returncode}, '
                            f'{len(errors)} error line(s); log: {log}):\n'
                            + '\n'.join(errors[-20:]) + hint)
    record = dict(model=name, pretrained=osp.abspath(pretrained), tasks=list(tasks),
                  results=read_results(output_path, tasks), dir=work, command=command, log=log)
    if predictions is not None and local:
        by_id = {str(p['id']): p for p in predictions}
        record['agreement'] = {task: agreement(task, read_samples(output_path, task),
                                               task_rows(task, rows), by_id)
                               for task in local}
    return record
