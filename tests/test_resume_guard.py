"""What a run may trust and change: config drift on resume, --resume with
nothing to resume, --cfg-options, the work-dir lock, leftovers of killed
writes, and tools/benchmark.py's arguments."""
import json
import os
import os.path as osp
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from mmengine.config import Config
from mmengine.logging import MMLogger

import dpa  # noqa: F401
from dpa.artifacts import read_manifest
from dpa.engine.config_guard import STAGE_CONFIG, check_cfg_options
from dpa.errors import ConfigError
from dpa.engine.interrupts import TrainingInterrupted
from dpa.benchmark import cli as benchmark_cli
from dpa.engine.pipeline import run_pipeline
from dpa.engine.stage_config import STAGES
from dpa.engine.workdir import (LOCK_FILE, _process_start, remove_stale_temp_files,
                                work_dir_lock)
from test_reliability import SignalAt  # noqa: F401  (registers the hook)
from tiny import REPO, TINY, tiny_config

sys.path.insert(0, osp.join(REPO, 'tools'))
import train  # noqa: E402


def copy_finished_stages(finished, stage, tmp_path):
    work_dir, _ = finished
    for previous in STAGES[:STAGES.index(stage)]:
        shutil.copytree(osp.join(work_dir, previous), tmp_path / previous)


class Messages:
    """Collects what mmengine's current logger logs."""

    def __init__(self):
        import logging

        class Handler(logging.Handler):
            def emit(handler, record):
                self.lines.append(record.getMessage())

        self.lines, self.handler = [], Handler()
        self.logger = MMLogger.get_current_instance()
        self.logger.addHandler(self.handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    def text(self):
        return '\n'.join(self.lines)


# ---------------------------------------------------------------- resume drift

@pytest.fixture
def interrupted_align(finished, data_root, tmp_path):
    """An align stage stopped by SIGTERM after iteration 6 (of 16)."""
    copy_finished_stages(finished, 'align', tmp_path)
    cfg = tiny_config(tmp_path, data_root, custom_hooks=[dict(type='SignalAt', at=5,
                                                              signum=signal.SIGTERM)])
    with pytest.raises(TrainingInterrupted):
        run_pipeline(cfg, stage='align')
    assert osp.isfile(tmp_path / 'align' / STAGE_CONFIG)
    return tmp_path


@pytest.mark.parametrize('overrides, keys', [
    ({'align.optim_wrapper.optimizer.lr': 1e-3}, ['align.optim_wrapper.optimizer.lr']),
    # More samples per step would double the iterations and freeze the lr at its end.
    ({'align.batch_size': 2, 'align.global_batch_size': 4},
     ['align.batch_size', 'align.global_batch_size']),
    ({'align.loss.clamp': [0.1, 0.5]}, ['align.loss.clamp']),
    # TF32 matmuls round differently (a no-op on this CPU, but the config says it).
    ({'tf32': True}, ['tf32']),
])
def test_resume_refuses_a_changed_config_naming_the_keys(interrupted_align, data_root, overrides,
                                                         keys):
    cfg = tiny_config(interrupted_align, data_root, **overrides)
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg, stage='align', resume=True)
    message = str(err.value)
    for key in keys:
        assert key in message
    assert '--allow-config-change' in message
    assert read_manifest(str(interrupted_align), 'align') is None


def test_resume_may_be_told_to_accept_a_change_and_records_it(interrupted_align, data_root):
    # Checkpoint cadence and workers do not change the result: no flag needed for them.
    [manifest] = run_pipeline(tiny_config(interrupted_align, data_root,
                                          **{'align.optim_wrapper.optimizer.lr': 1e-3}),
                              stage='align', resume=True, allow_config_change=True)
    assert manifest['iterations'] == 16
    assert manifest['config_changed_on_resume'] == {
        'align.optim_wrapper.optimizer.lr': [0.002, 0.001]}


def test_resume_with_nothing_to_resume_says_so(finished, data_root, tmp_path):
    copy_finished_stages(finished, 'align', tmp_path)
    with pytest.raises(ConfigError, match="stage 'align' has no intact checkpoint"):
        run_pipeline(tiny_config(tmp_path, data_root), stage='align', resume=True)
    assert not osp.exists(tmp_path / 'align' / 'iter_8.pth')  # nothing trained either


def test_allow_config_change_needs_resume(tmp_path):
    with pytest.raises(SystemExit, match='only applies with --resume'):
        train.main([TINY, '--work-dir', str(tmp_path), '--allow-config-change'])


# ---------------------------------------------------------------- --cfg-options

@pytest.mark.parametrize('option, message', [
    ('proxy.batchsize=2', 'no `proxy.batchsize`; did you mean `proxy.batch_size`'),
    ('prxy.batch_size=2', 'no `prxy`; did you mean `proxy.batch_size`'),
    ('align.batch_size=abc', "align.batch_size='abc': expected int"),
    ('lr=fast', 'no `lr`; did you mean one of `proxy.optim_wrapper.optimizer.lr`'),
    ('align.optim_wrapper.optimizer.lr=fast', 'expected float'),
    ('model.text_pas=masked', 'did you mean `model.text_pass`'),
    ('llm.torch_dtyp=bfloat16', 'did you mean `llm.torch_dtype`'),
])
def test_cfg_options_refused_before_any_model_loads(tmp_path, option, message):
    with pytest.raises(SystemExit) as err:
        train.main([TINY, '--work-dir', str(tmp_path / 'work'), '--cfg-options', option])
    assert str(err.value).startswith('config error: --cfg-options') and message in str(err.value)
    assert not osp.exists(tmp_path / 'work')  # refused before the run started


@pytest.mark.parametrize('options', [
    {'tiny_standin': True, 'standin_data_root': '/tmp/x'}, {'skip_nonfinite_steps': True},
    {'max_image_pixels': 1024 ** 2}, {'pad_to_square': True}, {'synthetic_data': None},
    {'proxy.num_workers': 2}, {'finetune.init_from_proxy': True}, {'align.use_proxy': False},
    {'llm.attn_implementation': 'eager'}, {'llm.config.rope_theta': 1e6},
    {'align.optim_wrapper.optimizer.lr': 1}, {'model.loss_chunk_size': None},
    {'caption_data.data_files': ['a.json']}, {'stages': ['proxy']},
    {'compile': True}, {'tf32': False}, {'dataloader.num_workers': 2},
])
def test_cfg_options_a_user_may_add_or_set(options):
    check_cfg_options(Config.fromfile(TINY), options)


def test_cfg_options_narrow_a_kernel_preference_list_to_one_kernel():
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'dpa_qwen2_5_7b.py'))
    assert isinstance(cfg.llm.attn_implementation, (list, tuple))
    check_cfg_options(cfg, {'llm.attn_implementation': 'sdpa'})
    with pytest.raises(ConfigError, match='expected list'):
        check_cfg_options(cfg, {'llm.attn_implementation': 3})


def test_cfg_options_path_variables():
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'dpa_qwen2_5_7b.py'))
    variables = [key for key in ('llm_path', 'data_root') if key in cfg]
    check_cfg_options(cfg, {key: '/somewhere' for key in variables})
    if variables:
        with pytest.raises(ConfigError, match=f'did you mean `{variables[0]}`'):
            check_cfg_options(cfg, {variables[0][:-1]: '/x'})


# ---------------------------------------------------------------- work-dir lock

def write_lock(work_dir, pid, start=None):
    os.makedirs(work_dir, exist_ok=True)
    with open(osp.join(work_dir, LOCK_FILE), 'w') as f:
        json.dump(dict(pid=pid, host=socket.gethostname(), start=start,
                       started='2026-11-25 10:00:00', command='tools/train.py other'), f)


def dead_pid():
    process = subprocess.Popen([sys.executable, '-c', 'pass'])
    process.wait()
    return process.pid


def test_a_busy_work_dir_is_refused_at_once_naming_the_other_run(tmp_path, data_root):
    other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        write_lock(tmp_path, other.pid, _process_start(other.pid))
        with pytest.raises(SystemExit) as err:
            train.main([TINY, '--work-dir', str(tmp_path), '--cfg-options',
                        f'synthetic_data.root={data_root}'])
        message = str(err.value)
        assert f'in use by process {other.pid} on {socket.gethostname()}' in message
        assert '2026-11-25 10:00:00' in message and LOCK_FILE in message
        assert not osp.exists(tmp_path / 'proxy')
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_and_dead_writers_leftovers_are_cleared(finished, data_root, tmp_path):
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    gone = dead_pid()
    write_lock(tmp_path, gone)
    leftovers = [tmp_path / 'align' / f'iter_16.pth.tmp-{gone}',
                 tmp_path / 'finetune' / f'artifact.tmp-{gone}']
    leftovers[0].write_bytes(b'half a checkpoint')
    leftovers[1].mkdir()
    (leftovers[1] / 'model.safetensors').write_bytes(b'half')
    alive = tmp_path / 'align' / f'iter_16.pth.tmp-{os.getppid()}'
    alive.write_bytes(b'another live writer')
    with Messages() as log:
        manifests = run_pipeline(tiny_config(tmp_path, data_root), stage='align')
    assert manifests[0]['skipped']
    assert f'taking over the stale lock {tmp_path / LOCK_FILE} of process {gone}' in log.text()
    for path in leftovers:
        assert not osp.exists(path) and f'removed {path}' in log.text()
    assert osp.exists(alive)
    assert not osp.exists(tmp_path / LOCK_FILE)  # released at the end


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    with work_dir_lock(str(tmp_path), 'pytorch'):
        assert not osp.exists(tmp_path / LOCK_FILE)
    monkeypatch.setenv('RANK', '0')
    with work_dir_lock(str(tmp_path), 'pytorch'):
        assert json.load(open(tmp_path / LOCK_FILE))['pid'] == os.getpid()


def test_temp_files_of_live_writers_are_kept(tmp_path):
    gone = dead_pid()
    (tmp_path / f'x.tmp-{os.getppid()}').write_text('')
    (tmp_path / f'y.tmp-{gone}').write_text('')
    assert remove_stale_temp_files(str(tmp_path)) == [str(tmp_path / f'y.tmp-{gone}')]
    assert os.listdir(tmp_path) == [f'x.tmp-{os.getppid()}']


# ---------------------------------------------------------------- benchmark arguments

@pytest.mark.parametrize('argv, message', [
    (['--steps', '0'], '--steps: 0 is not at least 1'),
    (['--batch-size', '0'], '--batch-size: 0 is not at least 1'),
    (['--heads', '3'], '--hidden-size 256 is not a multiple of --heads 3'),
    (['--dtype', 'float99'], "invalid choice: 'float99'"),
    (['--threads', '0'], '--threads: 0 is not at least 1'),
    (['--vocab-sizes', '0'], '--vocab-sizes: 0 is not at least 1'),
    (['--vocab-sizes', '4'], 'the vocabulary needs more than'),
    (['--warmup', '0'], '--warmup: 0 is not at least 1'),
    (['--kv-heads', '3'], '--heads 4 is not a multiple of --kv-heads 3'),
    (['--caption-tokens', '48', '8'], 'the first is the minimum'),
    (['--json', '/no/such/folder/bench.json'], 'does not exist'),
])
def test_benchmark_refuses_bad_arguments_before_running(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        benchmark_cli.parse_args(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_benchmark_default_arguments_pass():
    args = benchmark_cli.parse_args([])
    assert args.warmup == 1 and args.variants[0] == 'vanilla'


# ---------------------------------------------------------------- a full disk

def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from dpa.artifacts import atomic_write, write_artifact_dir

    def disk_full(*args):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError, match='No space left'):
        atomic_write(b'checkpoint bytes', str(tmp_path / 'iter_8.pth'))
    with pytest.raises(OSError, match='No space left'):
        write_artifact_dir(str(tmp_path / 'artifact'), disk_full)
    assert os.listdir(tmp_path) == []
