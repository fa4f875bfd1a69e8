"""The training console (progress bar on a terminal, plain lines otherwise,
mmengine's records in the log file, harmless warnings dropped), the dry run
of every config, and each stage's curves.png."""
import glob
import io
import json
import logging
import math
import os.path as osp
import runpy
import sys
import types
import warnings

import mmengine.config.config as mmengine_config
import pytest
import transformers
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import MessageHub, MMLogger, print_log

import dpa  # noqa: F401
from dpa.engine.console import (CONSOLE_INFO_RECORDS, HARMLESS_MMENGINE_RECORDS,
                                HARMLESS_WARNINGS, ConsoleProgressHook,
                                MessageFilter, WarningsAndFilter, stage_console)
from dpa.datasets.mixture import data_sources
from dpa.engine import curves
from dpa.engine.curves import CURVES_FILE, plot_curves, read_scalar_log
from dpa.engine.dry_run import dry_run
from dpa.errors import ConfigError
from dpa.engine import pipeline
from dpa.engine.pipeline import run_pipeline
from dpa.engine.preflight import plan_run
from dpa.engine.standin import TINY_BATCH, TINY_DATA
from dpa.registry import HOOKS

from tiny import REPO, TINY, tiny_config

CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', '*.py'))
                 + glob.glob(osp.join(REPO, 'configs', 'ablations', '*.py')))
DATA_KEYS = {'proxy': 'caption_data', 'align': 'caption_data', 'finetune': 'instruct_data'}


class FakeStream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


class FakeRunner:
    """What the progress hook reads of a Runner: iterations and logged scalars."""

    def __init__(self, max_iters):
        self.max_iters, self.iter = max_iters, 0
        self.message_hub = MessageHub(f'console_test_{id(self)}')


def run_hook(terminal: bool, total=12, interval=5, monkeypatch=None):
    stream = FakeStream(terminal)
    monkeypatch.setattr(sys, 'stdout', stream)
    hook, runner = ConsoleProgressHook('align', interval), FakeRunner(total)
    hook.before_train(runner)
    for i in range(total):
        runner.iter = i
        runner.message_hub.update_scalar('train/loss', 2.0 + i)
        runner.message_hub.update_scalar('train/cmo_w_mean', 0.25)
        runner.message_hub.update_scalar('train/skipped_rows', 1)
        hook.after_train_iter(runner, i)
    hook.after_train(runner)
    return stream.getvalue()


def test_plain_lines_when_stdout_is_not_a_terminal(monkeypatch):
    out = run_hook(False, monkeypatch=monkeypatch)
    lines = out.splitlines()
    # Every `interval` iterations and at the last; the loss is the mean of the window.
    assert [line.split(']')[1] for line in lines] == [' Iter(train) [ 5/12', ' Iter(train) [10/12',
                                                      ' Iter(train) [12/12']
    assert 'loss 4.0000' in lines[0] and 'CMO w 0.250' in lines[0] and 'skipped 1' in lines[0]
    assert '\r' not in out


def test_progress_bar_when_stdout_is_a_terminal(monkeypatch):
    out = run_hook(True, monkeypatch=monkeypatch)
    assert '\r' in out and '12/12' in out  # tqdm redraws one line
    assert 'loss=' in out and 'skipped=1' in out
    assert 'Iter(train)' not in out


def test_harmless_warnings_are_dropped_inside_a_stage_only():
    category, pattern = HARMLESS_WARNINGS[0]
    message = pattern.replace('\\', '')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        with stage_console(accumulation=2):
            warnings.warn(message, category)
            warnings.warn('Detected call of `scheduler.step()` before `optimizer.step()`.',
                          UserWarning)
            warnings.warn('a real problem', UserWarning)
        with stage_console(accumulation=1):
            # Without accumulation a scheduler step before an optimizer step is a bug.
            warnings.warn('Detected call of `scheduler.step()` before `optimizer.step()`.',
                          UserWarning)
        warnings.warn(message, category)
    assert [str(w.message)[:20] for w in seen] == [
        'a real problem', 'Detected call of `sc', message[:20]]


def test_message_filter_matches_mmengine_records():
    record = logging.LogRecord('mmengine', logging.WARNING, __file__, 1,
                               '"FileClient" will be deprecated in future. Please use io', (),
                               None)
    assert not MessageFilter([r'"FileClient" will be deprecated']).filter(record)
    assert MessageFilter([r'"HardDiskBackend"']).filter(record)
    # A stage of several epochs: mmengine warns as its data loader starts the next one.
    restart = logging.LogRecord(
        'mmengine', logging.WARNING, __file__, 1, 'Reach the end of the dataloader, it will be '
        'restarted and continue to iterate. It is recommended to use ...', (), None)
    assert not MessageFilter(HARMLESS_MMENGINE_RECORDS).filter(restart)
    console = WarningsAndFilter(CONSOLE_INFO_RECORDS)
    assert console.filter(record)  # a warning
    info = [logging.LogRecord('mmengine', logging.INFO, __file__, 1, text, (), None)
            for text in ('resumed epoch: 0, iter: 8', 'Config:\nmodel = ...')]
    assert [console.filter(r) for r in info] == [True, False]


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    return tmp_path_factory.mktemp('console') / 'data'


@HOOKS.register_module(force=True)
class BuildTimeMessages(Hook):
    """Speaks while the Runner is being built, as model builders do."""

    def __init__(self):
        print_log('a warning while building', logger='current', level=logging.WARNING)
        print_log('an info record while building', logger='current')
        print('a plain print while building')


def align_only(work_dir, data_root):
    """A two-iteration align stage on its own."""
    cfg = tiny_config(work_dir, data_root, stages=['align'],
                      custom_hooks=[dict(type='BuildTimeMessages')])
    cfg.synthetic_data.update(num_captions=8, num_instructions=4, num_eval=4, image_size=32)
    cfg.align.use_proxy = False
    cfg.align.batch_size = 4
    cfg.default_hooks.logger.interval = 1
    return cfg


@pytest.mark.parametrize('verbose', [False, True])
def test_stage_console_and_log_file(tmp_path, small_data, capsys, monkeypatch, verbose):
    # yapf formats the logged config, most of a tiny stage's start-up; the text is the same.
    monkeypatch.setattr(mmengine_config, 'FormatCode', lambda text, **kwargs: (text, None))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        (manifest, ) = run_pipeline(align_only(tmp_path, small_data), verbose=verbose)
    out = capsys.readouterr().out
    (log, ) = glob.glob(str(tmp_path / 'align' / '*' / '*.log'))
    log_text = open(log).read()
    # The log file holds everything mmengine logs, whatever the console shows.
    for record in ('System environment', 'Config:', 'Hooks will be executed',
                   'Iter(train) [2/2]', '"FileClient" will be deprecated'):
        assert record in log_text
    start = (f'[align] 8 samples, batch 4 x 1 processes x 2 accumulation = global batch 8; '
             f'2 iterations; log: {log}')
    assert start in out and start in log_text
    assert 'FileClient' not in out
    assert 'a warning while building' in out and 'a plain print while building' in out
    assert 'an info record while building' in log_text
    assert not [w for w in seen if 'scheduler.step()' in str(w.message)]
    if verbose:
        assert 'System environment' in out and 'Iter(train) [2/2]' in out
        assert '[align] Iter(train)' not in out
    else:
        assert 'System environment' not in out and 'Iter(train) [2/2]  lr' not in out
        assert 'an info record while building' not in out
        assert '[align] Iter(train) [1/2]  eta' in out and '[align] Iter(train) [2/2]  eta' in out
    assert osp.isfile(osp.join(tmp_path, 'align', CURVES_FILE))
    assert manifest['iterations'] == 2


def test_stages_started_in_the_same_second_log_to_their_own_files(
        tmp_path, small_data, monkeypatch):
    # mmengine names its logger and visualizer by experiment name and a
    # one-second timestamp; freeze the clock so both runs get the same one.
    import mmengine.runner.runner as runner_module
    import time
    frozen = types.SimpleNamespace(time=lambda: 1.8e9, strftime=time.strftime,
                                   localtime=time.localtime)
    monkeypatch.setattr(runner_module, 'time', frozen)
    monkeypatch.setattr(mmengine_config, 'FormatCode', lambda text, **kwargs: (text, None))
    for run in ('first', 'second'):
        run_pipeline(align_only(tmp_path / run, small_data))
    for run in ('first', 'second'):
        (log, ) = glob.glob(str(tmp_path / run / 'align' / '*' / '*.log'))
        assert 'Iter(train) [2/2]' in open(log).read()
        (scalars, ) = glob.glob(str(tmp_path / run / 'align' / '*' / 'vis_data' / 'scalars.json'))
        assert len(open(scalars).readlines()) == 2


# --------------------------------------------------------------------------- #
# Curves
# --------------------------------------------------------------------------- #

def write_scalars(stage_dir, run, records):
    path = stage_dir / run / 'vis_data'
    path.mkdir(parents=True)
    with open(path / 'scalars.json', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)


def test_scalar_log_of_a_resumed_stage(tmp_path):
    write_scalars(tmp_path, '20260101_000000', [dict(step=4, loss=3.0), dict(step=8, loss=2.5)])
    # Resumed from the checkpoint at 4: iteration 8 is logged again.
    write_scalars(tmp_path, '20260101_010000', [dict(step=8, loss=2.4), dict(step=12, loss=2.0)])
    records = read_scalar_log(str(tmp_path))
    assert {s: r['loss'] for s, r in records.items()} == {4: 3.0, 8: 2.4, 12: 2.0}


def test_curves_need_matplotlib_only(tmp_path, monkeypatch, capsys):
    pytest.importorskip('matplotlib')
    write_scalars(tmp_path, '20260101_000000',
                  [dict(step=i, loss=3.0 / i, cmo_w_mean=0.1, cmo_at_min=0.5, cmo_at_max=0.1)
                   for i in range(1, 5)])
    path = plot_curves(str(tmp_path), 'align')
    assert path == str(tmp_path / CURVES_FILE) and osp.getsize(path) > 1000
    (tmp_path / CURVES_FILE).unlink()
    MMLogger.get_instance('curves_test')  # the current logger, printing to this test's stdout
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)  # import fails
    monkeypatch.setattr(curves, '_noted_missing_matplotlib', [])
    assert plot_curves(str(tmp_path), 'align') is None
    assert plot_curves(str(tmp_path), 'finetune') is None
    assert not (tmp_path / CURVES_FILE).exists()
    assert capsys.readouterr().out.count('matplotlib is not installed') == 1


def test_every_stage_of_the_tiny_default_has_curves(finished):
    pytest.importorskip('matplotlib')
    work_dir, manifests = finished
    for stage in ('proxy', 'align', 'finetune'):
        assert osp.getsize(osp.join(work_dir, stage, CURVES_FILE)) > 1000


# --------------------------------------------------------------------------- #
# Dry run
# --------------------------------------------------------------------------- #

@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('the dry run built a model')
    monkeypatch.setattr(transformers.PreTrainedModel, '__init__', refuse)


def stage_blocks(text):
    blocks, name = {}, None
    for line in text.splitlines()[1:]:
        if line.startswith('['):
            name = line.strip('[]')
            blocks[name] = []
        else:
            blocks[name].append(line.strip())
    return blocks


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: osp.relpath(p, REPO))
def test_dry_run_of_every_config_on_its_standin(path, tmp_path, no_model_loads):
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(dict(work_dir=str(tmp_path / 'work'), tiny_standin=True,
                             standin_data_root=str(tmp_path / 'data')))
    blocks = stage_blocks(dry_run(cfg))
    assert list(blocks) == list(cfg.get('stages', ['proxy', 'align', 'finetune']))
    for stage, lines in blocks.items():
        if stage == 'eval':
            continue
        rows = TINY_DATA['num_captions' if DATA_KEYS[stage] == 'caption_data'
                         else 'num_instructions']
        samples = sum(round(source.get('ratio', 1.0) * rows)
                      for source in data_sources(cfg[DATA_KEYS[stage]]).values())
        iterations = math.ceil(samples / TINY_BATCH) * cfg[stage].get('max_epochs', 1)
        expected = (f'at most {iterations}' if cfg[stage].get('pack') else
                    f'iterations: {iterations} ')
        assert any(expected in line for line in lines), (stage, lines)
        assert any(line.startswith('writes: ') for line in lines)
        # A stand-in stage takes one optimizer step, inside the warm-up: lr 0 (issue 23).
        if any('(1 epoch(s) of' in line and ', 1 optimizer steps)' in line for line in lines):
            assert any(line.startswith('warning: 1 optimizer step(s), all within the warm-up')
                       and 'its only step runs at lr 0' in line for line in lines), lines
    # What the final stage writes: InternLM2 is no transformers architecture.
    [final] = [line for line in blocks['finetune'] if line.startswith('writes: ')]
    if 'internlm' in osp.basename(path):
        assert final.startswith('writes: native model only, no transformers export (internlm2 '
                                'is not a transformers architecture'), final
    else:
        export = 'LLaVA-NeXT' if cfg.get('anyres') else 'LLaVA'
        assert final.startswith(f'writes: native model + transformers {export} export'), final
    assert not (tmp_path / 'data').exists() and not (tmp_path / 'work').exists()


def test_dry_run_counts_real_data_rows_and_stops_at_config_errors(tmp_path, no_model_loads):
    rows = [dict(image='a.png', conversations=[dict(**{'from': 'human', 'value': 'x'})])] * 10
    (tmp_path / 'captions.json').write_text(json.dumps(rows))
    cfg = tiny_config(tmp_path / 'work', tmp_path / 'data')
    cfg.synthetic_data = None
    cfg.caption_data = dict(data_files=[str(tmp_path / 'captions.json')],
                            image_folder=str(tmp_path))
    cfg.instruct_data = dict(data_files=[str(tmp_path / 'captions.json')],
                             image_folder=str(tmp_path))
    cfg.stages = ['align', 'finetune']
    cfg.align.use_proxy = False
    blocks = stage_blocks(dry_run(cfg))
    assert f"data: {tmp_path / 'captions.json'}: 10 rows" in blocks['align']
    assert 'iterations: 3 (1 epoch(s) of 10 samples, 2 optimizer steps)' in blocks['align']
    cfg.instruct_data.data_files = [str(tmp_path / 'missing.json')]
    with pytest.raises(ConfigError, match='missing.json'):
        dry_run(cfg)


def test_train_cli_dry_run(tmp_path, capsys, no_model_loads):
    main = runpy.run_path(osp.join(REPO, 'tools', 'train.py'))['main']
    main([TINY, '--dry-run', '--work-dir', str(tmp_path)])
    out = capsys.readouterr().out
    # The count is of every stage the plan lists, the closing eval stage too.
    assert out.startswith('Plan of 4 stage(s)') and out.count('\n[') == 4 and '[eval]' in out
    assert 'warning' not in out  # the tiny default's stages leave their warm-up
    with pytest.raises(SystemExit, match='config error: .*is not a directory'):
        main([osp.join(REPO, 'configs', 'dpa_qwen2_5_7b.py'), '--dry-run'])


def test_the_run_follows_the_plan_the_dry_run_prints(finished, data_root, monkeypatch):
    """One source: the dry run prints ``plan_run``'s plan, and ``run_pipeline``
    runs exactly the stages of the plan it makes with the same function, in
    the same states (here all finished, so nothing trains)."""
    work_dir, _ = finished
    planned = plan_run(tiny_config(work_dir, data_root))
    text = dry_run(tiny_config(work_dir, data_root))
    assert [line[1:-1] for line in text.splitlines() if line.startswith('[')] == \
        [s.name for s in planned.stages] == ['proxy', 'align', 'finetune', 'eval']
    assert text.startswith(f'Plan of {len(planned.stages)} stage(s)')
    followed = []

    def recorded(*args, **kwargs):
        followed.append(real_plan_stages(*args, **kwargs))
        return followed[-1]

    real_plan_stages = pipeline.plan_stages
    monkeypatch.setattr(pipeline, 'plan_stages', recorded)
    manifests = run_pipeline(tiny_config(work_dir, data_root))
    assert [(s.name, s.state) for s in followed[0].stages] == \
        [(s.name, s.state) for s in planned.stages]
    assert [s.state for s in planned.stages[:3]] == ['finished'] * 3
    assert [m['stage'] for m in manifests] == [s.name for s in planned.stages]
    assert all(m['skipped'] for m in manifests)
    # One training stage with --stage: a plan of that stage alone, no eval.
    assert [s.name for s in plan_run(tiny_config(work_dir, data_root), 'align').stages] == \
        ['align']


def test_tensorboard_is_one_uncommented_line(tmp_path):
    pytest.importorskip('tensorboard')
    from mmengine.visualization import Visualizer
    path = osp.join(REPO, 'configs', '_base_', 'default_runtime.py')
    text = open(path).read()
    line = "    # dict(type='TensorboardVisBackend'),\n"
    assert text.count(line) == 1
    cfg = Config.fromstring(text.replace(line, line.replace('# ', '', 1)), '.py')
    backends = [b['type'] for b in cfg.visualizer.vis_backends]
    assert backends == ['LocalVisBackend', 'TensorboardVisBackend']
    visualizer = Visualizer.get_instance('tensorboard_switch_test', save_dir=str(tmp_path),
                                         vis_backends=cfg.visualizer.vis_backends)
    visualizer.add_scalars({'loss': 1.0}, step=1)
    visualizer.close()
    assert glob.glob(str(tmp_path / 'vis_data' / 'events.out.tfevents.*'))
