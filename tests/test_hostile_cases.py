"""The hostile first-week cases (issue 24), one row each.

Each row does what a new user did (a flipped byte, an edited file, a wrong
value) through the command line or the function it calls, and names the exit
code and the words the message must hold. A traceback fails the row. The next
hostile case is one more row.
"""
import contextlib
import errno
import glob
import importlib
import io
import json
import os
import os.path as osp
import shutil
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pytest
import torch
from safetensors import SafetensorError

import dpa  # noqa: F401
from dpa.datasets.validation import check_files
from dpa.engine import checkpoint as dpa_checkpoint
from dpa.engine.config_guard import result_config
from dpa.engine.curves import CURVES_FILE, plot_curves
from dpa.engine.hooks import DPAHook, sort_adapter_config
from dpa.engine.pipeline import prepare_synthetic_data
from dpa.engine.preflight import resolve_config
from dpa.engine.stage_config import STAGES, stage_dataset_config
from dpa.engine.summary import format_summary
from dpa.evaluation import evaluator
from dpa.registry import DATASETS
from tiny import REPO, TINY, tiny_config

sys.path.insert(0, osp.join(REPO, 'tools'))
pytestmark = pytest.mark.usefixtures('one_thread')

QA = [{'from': 'human', 'value': 'Describe it.'}, {'from': 'gpt', 'value': 'a red circle'}]


def flip_bytes(path, count=8):
    data = bytearray(open(path, 'rb').read())
    for i in range(count):
        data[len(data) // 2 + i] ^= 0xFF
    open(path, 'wb').write(bytes(data))


@dataclass
class Outcome:
    code: int
    text: str


class Run:
    """What a row works with: a fresh folder, the shared finished run (copied
    before anything is changed), the synthetic data, the command lines."""

    def __init__(self, tmp_path, data_root, finished, monkeypatch):
        self.tmp, self.data_root = tmp_path, str(data_root)
        self.finished = str(finished[0])
        self.monkeypatch = monkeypatch
        self.work_dir = str(tmp_path / 'work')
        self.images = osp.join(self.data_root, 'images')
        self.eval_data = osp.join(self.data_root, 'eval.jsonl')

    def copy_run(self, stages: Sequence[str] = STAGES) -> str:
        """The finished run's stages, copied to this row's work dir."""
        for stage in stages:
            shutil.copytree(osp.join(self.finished, stage), osp.join(self.work_dir, stage))
        return self.work_dir

    def write(self, name: str, content) -> str:
        path = str(self.tmp / name)
        with open(path, 'w') as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        return path

    def captions(self, drop: int = 0) -> str:
        """A copy of the synthetic captions (without the last ``drop`` rows)."""
        rows = json.load(open(osp.join(self.data_root, 'captions.json')))
        return self.write('mine.json', rows[:len(rows) - drop])

    def tool(self, name: str, *args) -> Outcome:
        """``tools/<name>.py ARGS``, in this process. Its output goes to a
        buffer of its own, which the loggers it creates keep, harmlessly."""
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                importlib.import_module(name).main([str(a) for a in args])
            code, message = 0, ''
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
            message = '' if isinstance(exit_.code, int) else str(exit_.code)
        return Outcome(code, '\n'.join([message, out.getvalue()]))

    def train(self, *args, options: Sequence[str] = (), config: str = TINY,
              work_dir: Optional[str] = None) -> Outcome:
        return self.tool('train', config, *args, '--work-dir', work_dir or self.work_dir,
                         '--cfg-options', f'synthetic_data.root={self.data_root}', *options)

    def eval(self, model, *args, data: Optional[str] = None) -> Outcome:
        return self.tool('eval', model, '--data', data or self.eval_data, '--image-folder',
                         self.images, '--out', self.tmp / 'eval_out', *args)

    def exists(self, *parts) -> bool:
        return osp.exists(osp.join(self.work_dir, *parts))

    def dataset(self, rows, stage='proxy'):
        cfg = tiny_config(self.work_dir, self.data_root)
        cfg.merge_from_dict({'caption_data.data_files': [self.write('rows.json', rows)],
                             'caption_data.image_folder': self.images})
        return DATASETS.build(stage_dataset_config(cfg, stage))


@dataclass
class Case:
    name: str
    act: Callable[[Run], Outcome]
    code: int = 1
    says: Sequence[str] = ()
    then: Optional[Callable[[Run], bool]] = None  # what must hold afterwards


# ---------------------------------------------------------------- row actions

def flipped_final_model(run, *tool_args, tool='eval', file='llm/model.safetensors'):
    work_dir = run.copy_run()
    flip_bytes(osp.join(work_dir, 'finetune', 'artifact', file))
    if tool == 'eval':
        model = osp.join(work_dir, 'finetune', 'artifact', 'hf_llava') if 'hf_llava' in file \
            else work_dir
        return run.eval(model, *tool_args)
    if tool == 'chat':
        return run.tool('chat', work_dir, '--prompt', 'What shape?', *tool_args)
    if tool == 'analysis':
        return run.tool('analyze_relevance', TINY, '--work-dir', work_dir, '--stage', 'finetune',
                        '--model', 'trained', '--num', 2, '--out', run.tmp / 'relevance',
                        '--cfg-options', f'synthetic_data.root={run.data_root}')
    shutil.rmtree(osp.join(work_dir, 'eval'), ignore_errors=True)
    return run.train()  # the pipeline's eval stage


def flipped_proxy_adapter(run):
    work_dir = run.copy_run(['proxy'])
    flip_bytes(osp.join(work_dir, 'proxy', 'artifact', 'adapter_model.safetensors'))
    return run.tool('analyze_prior', TINY, '--work-dir', work_dir, '--num', 2, '--out',
                    run.tmp / 'prior.json', '--cfg-options',
                    f'synthetic_data.root={run.data_root}')


def align_trained_again(run):
    run.copy_run()
    os.remove(osp.join(run.work_dir, 'align', 'manifest.json'))
    return run.train()


def projector_changed_since(run, *args):
    run.copy_run()
    path = osp.join(run.work_dir, 'finetune', 'manifest.json')
    manifest = json.load(open(path))
    manifest['made_from']['input_checksums']['projector'] = '0' * 64
    json.dump(manifest, open(path, 'w'))
    return run.train('--stage', 'finetune', *args)


def retrained_stale(run):
    return (glob.glob(osp.join(run.work_dir, 'finetune.stale-*')) and run.exists(
        'finetune', 'manifest.json') and json.load(open(osp.join(
            run.work_dir, 'finetune', 'manifest.json')))['made_from']['input_checksums'][
                'projector'] != '0' * 64)


def resume_after_align_changed(run):
    """finetune stopped at a checkpoint, then align was trained again."""
    run.copy_run()
    os.remove(osp.join(run.work_dir, 'finetune', 'manifest.json'))
    path = osp.join(run.work_dir, 'finetune', 'stage_config.json')
    saved = json.load(open(path))
    saved['input_checksums']['projector'] = '0' * 64
    json.dump(saved, open(path, 'w'))
    return run.train('--stage', 'finetune', '--resume')


def resume_with_edited_data(run, *args):
    """A proxy stage stopped at its last checkpoint, started on the user's
    caption file, which has lost 10 rows since (as check_data suggests)."""
    mine = run.captions()
    options = [f'caption_data.data_files=[{mine}]', f'caption_data.image_folder={run.images}']
    run.copy_run(['proxy'])
    os.remove(osp.join(run.work_dir, 'proxy', 'manifest.json'))
    cfg = tiny_config(run.work_dir, run.data_root)
    cfg.merge_from_dict({'caption_data.data_files': [mine],
                         'caption_data.image_folder': run.images})
    cfg, _ = resolve_config(cfg)
    prepare_synthetic_data(cfg)
    with open(osp.join(run.work_dir, 'proxy', 'stage_config.json'), 'w') as f:
        json.dump(result_config(cfg, 'proxy', 1), f)
    run.captions(drop=10)
    return run.train('--stage', 'proxy', '--resume', *args, options=options)


def data_change_recorded(run):
    manifest = json.load(open(osp.join(run.work_dir, 'proxy', 'manifest.json')))
    return any(k.startswith('data_checksums') for k in manifest['config_changed_on_resume'])


def user_data_in_tiny_run(run):
    mine = run.captions(drop=4)
    cfg = tiny_config(run.work_dir, run.data_root)
    cfg.merge_from_dict({'caption_data.data_files': [mine]})
    cfg, _ = resolve_config(cfg)
    prepare_synthetic_data(cfg)
    dry = run.train('--dry-run', options=[f'caption_data.data_files=[{mine}]'])
    ok = (list(cfg.caption_data.data_files) == [mine]
          and 'instructions' in cfg.instruct_data.data_files[0])
    return Outcome(dry.code if ok else -1, dry.text)


def skipped_at_training(run, rows, reason):
    """The dataset a stage trains on skips the row and says why, and
    check_data's file mode reports the same reason."""
    dataset = run.dataset(rows)
    skipped = [record['reason'] for record in dataset[1].get('skipped', [])]
    reported = [p['reason'] for p in check_files([dataset.data_files[0]], run.images)]
    return Outcome(0 if skipped == [reason] and reported == [reason] else -1,
                   f'training skipped {skipped}; check_data reported {reported}')


def bad_data_file(run, content, key='instruct_data', *args):
    path = run.write('bad.json', content)
    return run.train(*args, options=[f'{key}.data_files=[{path}]'])


def check_data_config(run, files):
    return run.tool('check_data', TINY, '--cfg-options', f'synthetic_data.root={run.data_root}',
                    f'caption_data.data_files=[{files}]')


def config_file(run, files):
    for name, content in files.items():
        run.write(name, content)
    return run.train(config=str(run.tmp / next(iter(files))))


def full_disk(run, where):
    def no_space(*args, **kwargs):
        if where == 'artifact':
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                  'StorageFull, message: "No space left on device" })')
        raise OSError(errno.ENOSPC, 'No space left on device')

    target = (DPAHook, '_write') if where == 'artifact' else (dpa_checkpoint, 'atomic_write')
    run.monkeypatch.setattr(*target, no_space)
    return run.train('--stage', 'proxy')


def nothing_half_written(run):
    left = glob.glob(osp.join(run.work_dir, 'proxy', '**', '*.tmp-*'), recursive=True)
    return not left and not run.exists('proxy', 'manifest.json') and not run.exists(
        'proxy', 'artifact')


def curves_on_full_disk(run):
    """The disk fills while curves.png is written: no png is left, whole or cut."""
    stage_dir = osp.join(run.copy_run(['proxy']), 'proxy')
    os.remove(osp.join(stage_dir, CURVES_FILE))

    def no_space(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    run.monkeypatch.setattr(os, 'fsync', no_space)
    try:
        plot_curves(stage_dir)
        return Outcome(-1, 'plot_curves wrote on a full disk')
    except OSError as err:
        left = [name for name in os.listdir(stage_dir) if name.startswith(CURVES_FILE)]
        return Outcome(1 if not left else -1, f'{err}; left: {left}')


def truncated(run, name):
    work_dir = run.copy_run()
    path = osp.join(work_dir, 'finetune', name)
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
    return work_dir


def sigterm_in_eval_stage(run):
    run.copy_run()
    real = evaluator.load_eval_model

    def load_then_signal(*args, **kwargs):
        model = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, mid-evaluation
        return model

    run.monkeypatch.setattr(evaluator, 'load_eval_model', load_then_signal)
    return run.train()


def adapter_config_sorted(run):
    folder = run.tmp / 'adapter'
    folder.mkdir()
    (folder / 'adapter_config.json').write_text(json.dumps(
        {'target_modules': ['v_proj', 'down_proj', 'q_proj'], 'r': 8}))
    sort_adapter_config(str(folder))
    again = (folder / 'adapter_config.json').read_bytes()
    finished = json.load(open(osp.join(run.finished, 'proxy', 'artifact',
                                       'adapter_config.json')))
    ok = (json.loads(again)['target_modules'] == ['down_proj', 'q_proj', 'v_proj']
          and finished['target_modules'] == sorted(finished['target_modules']))
    return Outcome(0 if ok else -1, again.decode())


def summary_with_skipped_rows(run):
    manifest = dict(stage='align', skipped=False, iterations=4, first_loss=1.0, last_loss=0.5,
                    skipped_rows=3, artifact_kind='projector',
                    artifact=osp.join(run.work_dir, 'align', 'artifact'))
    return Outcome(0, format_summary([manifest]))


ALL_BAD = [{'id': i, 'image': 'x.png'} for i in range(8)]
CUDA = torch.cuda.is_available()

CASES = [
    # Silent wrong results.
    Case('1 flipped final model: tools/eval', lambda r: flipped_final_model(r),
         says=['llm/model.safetensors does not match the sha256', 'finetune/manifest.json',
               '--no-verify']),
    Case('1 flipped hf_llava export: tools/eval',
         lambda r: flipped_final_model(r, file='hf_llava/model.safetensors'),
         says=['hf_llava/model.safetensors does not match the sha256']),
    Case('1 flipped final model: tools/eval --no-verify scores it',
         lambda r: flipped_final_model(r, '--no-verify'), code=0, says=['metrics:']),
    Case('1 flipped final model: tools/chat', lambda r: flipped_final_model(r, tool='chat'),
         says=['chat error', 'does not match the sha256']),
    Case('1 flipped final model: the eval stage', lambda r: flipped_final_model(r, tool='stage'),
         says=['llm/model.safetensors does not match the sha256', '--stage finetune']),
    Case('1 flipped final model: analysis', lambda r: flipped_final_model(r, tool='analysis'),
         says=['does not match the sha256', '--stage finetune']),
    Case('1 flipped proxy adapter: the prior diagnostic', flipped_proxy_adapter,
         says=['adapter_model.safetensors does not match the sha256', '--stage proxy']),
    Case('2 align trains again: finetune is stale', align_trained_again,
         says=['stale stage(s) finetune', "stage 'align'", '--rerun-stale'],
         then=lambda r: not r.exists('align', 'manifest.json')),
    Case('2 projector changed since finetune: stale', projector_changed_since,
         says=["the projector of stage 'align' changed", '--rerun-stale']),
    Case('2 --rerun-stale trains the stale stage again',
         lambda r: projector_changed_since(r, '--rerun-stale'), code=0,
         says=['finetune trained'], then=retrained_stale),
    Case('2 a stopped stage does not resume onto a changed earlier artifact',
         resume_after_align_changed, says=['input_checksums.projector', '--allow-config-change']),
    Case('3 --resume refuses edited data files', resume_with_edited_data,
         says=['data_checksums', 'mine.json', '--allow-config-change']),
    Case('3 --resume --allow-config-change records the data change',
         lambda r: resume_with_edited_data(r, '--allow-config-change'), code=0,
         then=data_change_recorded),
    Case('4 tiny default trains on the user\'s caption file', user_data_in_tiny_run, code=0,
         says=['mine.json: 60 rows', 'synthetic instruct_data']),
    Case('5 a duplicate id is skipped and listed at training',
         lambda r: skipped_at_training(r, [dict(id='a', conversations=QA),
                                           dict(id='a', conversations=QA)], 'duplicate_id'),
         code=0),
    Case('5 a conversation ending with a user turn is skipped and listed',
         lambda r: skipped_at_training(r, [dict(id='a', conversations=QA),
                                           dict(id='b', conversations=QA + QA[:1])],
                                       'ends_with_user_turn'), code=0),
    Case('6 eval row with image null is a bad row',
         lambda r: r.eval(r.finished, data=r.write('e.jsonl', json.dumps(
             dict(id=1, image=None, question='Colour?', answer='red')) + '\n')),
         says=['bad_image_field']),
    # Tracebacks.
    Case('7 truncated json data file, before any stage trains',
         lambda r: bad_data_file(r, '[{"id": 1, "conversa'),
         says=['instruct_data.data_files', 'bad.json is not valid json'],
         then=lambda r: not r.exists('proxy')),
    Case('7 json file holding jsonl lines',
         lambda r: bad_data_file(r, json.dumps(dict(id=1, conversations=QA)) + '\n'
                                 + json.dumps(dict(id=2, conversations=QA)) + '\n'),
         says=['is not valid json', '.jsonl']),
    Case('7 check_data, config mode, truncated file',
         lambda r: check_data_config(r, r.write('t.json', '[{"id"')),
         says=['unreadable_file', 't.json is not valid json']),
    Case('7 check_data, config mode, relative path from another directory',
         lambda r: check_data_config(r, 'data/not_here.json'),
         says=['unreadable_file', 'not_here.json does not exist', 'relative']),
    Case('8 empty eval file of the eval stage, before any stage trains',
         lambda r: r.train(options=[f"eval.data={r.write('e.json', '[]')}"]),
         says=['eval.data', 'e.json holds no rows'], then=lambda r: not r.exists('proxy')),
    Case('8 empty data file', lambda r: bad_data_file(r, '[]'),
         says=['instruct_data.data_files', 'holds no rows']),
    Case('8 every row bad', lambda r: bad_data_file(r, json.dumps(ALL_BAD), 'caption_data',
                                                    '--stage', 'proxy'),
         says=['training stopped', 'every row of', '8 x no_conversations', 'check_data']),
    Case('9 config with a syntax error', lambda r: config_file(r, {'bad.py': 'x = (1,\n'}),
         says=['config syntax error in', 'bad.py, line 1']),
    Case('9 config whose base has a syntax error',
         lambda r: config_file(r, {'top.py': "_base_ = ['base.py']\n", 'base.py': 'y = [\n'}),
         says=['config syntax error in', 'base.py, line 1']),
    Case('9 analysis tool, config with a syntax error',
         lambda r: r.tool('analyze_relevance', r.write('bad.py', 'x = (1,\n'), '--stage', 'align',
                          '--out', r.tmp / 'relevance'),
         says=['config syntax error in', 'bad.py, line 1']),
    Case('9 config file that does not exist',
         lambda r: r.train(config=str(r.tmp / 'nope.py')), says=['nope.py', 'does not exist']),
    *[Case(f'10 {option}', lambda r, o=option: r.train('--dry-run', options=[o]),
           says=[f"{option.split('=')[0]} must be a positive integer"])
      for option in ('align.batch_size=0', 'align.global_batch_size=0', 'align.batch_size=-4',
                     'align.max_epochs=0')],
    Case('11 work dir that is a file', lambda r: r.train(work_dir=r.write('file', 'x')),
         says=['is a file, not a directory', '--work-dir']),
    Case('11 work dir that cannot be created',
         lambda r: r.train(work_dir=osp.join(r.write('file', 'x'), 'work')),
         says=['cannot write to the work dir', '--work-dir']),
    Case('11 tools/eval with an unwritable output folder',
         lambda r: r.tool('eval', r.finished, '--data', r.eval_data, '--out',
                          osp.join(r.write('file', 'x'), 'out')),
         says=['cannot write the results to', '--out']),
    Case('12 disk full at the first checkpoint: run it again',
         lambda r: full_disk(r, 'checkpoint'), says=['no space left', '--stage proxy'],
         then=lambda r: nothing_half_written(r) and '--resume' not in r.last.text),
    Case('12 disk full writing the artifact', lambda r: full_disk(r, 'artifact'),
         says=['no space left', '--resume'], then=nothing_half_written),
    Case('12 disk full writing curves.png', curves_on_full_disk, says=['No space left']),
    Case('13 tools/eval: truncated final manifest',
         lambda r: r.eval(truncated(r, 'manifest.json')),
         says=['is not a readable manifest', '--stage finetune']),
    Case('13 tools/eval: truncated model.safetensors',
         lambda r: r.eval(truncated(r, 'artifact/llm/model.safetensors')),
         says=['model.safetensors does not match the sha256']),
    Case('13 tools/eval --no-verify: truncated model.safetensors',
         lambda r: r.eval(truncated(r, 'artifact/llm/model.safetensors'), '--no-verify'),
         says=['cannot load the model in']),
    Case('13 tools/eval: empty eval file', lambda r: r.eval(r.finished, data=r.write('e.json',
                                                                                     '[]')),
         says=['e.json holds no rows']),
    *([] if CUDA else [Case('13 tools/eval --device cuda:0 without CUDA',
                            lambda r: r.eval(r.finished, '--device', 'cuda:0'),
                            says=['no CUDA', '--device cpu'])]),
    Case('13 eval stage device, before any stage trains',
         lambda r: r.train(options=['eval.device=tpu']), says=["eval.device: --device 'tpu'"],
         then=lambda r: not r.exists('proxy')),
    Case('13 tools/eval --device tpu', lambda r: r.eval(r.finished, '--device', 'tpu'),
         says=["--device 'tpu'"]),
    Case('14 SIGTERM during the eval stage', sigterm_in_eval_stage, code=128 + signal.SIGTERM,
         says=["stage 'eval' interrupted by SIGTERM", '--resume'],
         then=lambda r: not r.exists('eval', 'manifest.json')),
    # Small things.
    Case('adapter_config.json lists target_modules sorted', adapter_config_sorted, code=0),
    Case('the summary shows skipped rows', summary_with_skipped_rows, code=0,
         says=['3 bad rows skipped', 'skipped_samples.jsonl']),
    Case('check_data refuses --cfg-options in file mode',
         lambda r: r.tool('check_data', r.eval_data, '--cfg-options', 'seed=1'),
         says=['--cfg-options applies to a config file']),
    Case('check_data refuses --image-folder in config mode',
         lambda r: r.tool('check_data', TINY, '--image-folder', r.images),
         says=['--image-folder applies to data files']),
    Case('dry run of a reused stage does not say it writes',
         lambda r: r.train('--dry-run', options=[f'proxy.from_work_dir={r.finished}']),
         code=0, says=['already finished in'],
         then=lambda r: 'writes: PEFT' not in r.last.text),
    Case('eval: every row bad with --skip-bad-rows says so',
         lambda r: r.eval(r.finished, '--skip-bad-rows', data=r.write('e.jsonl', json.dumps(
             dict(id=1, question='Colour?')) + '\n')),
         says=['Every row is bad'], then=lambda r: 'pass --skip-bad-rows' not in r.last.text),
]


def play(case: Case, run: Run) -> Outcome:
    """Act out one row and check its exit code, its words and what must hold
    afterwards (every round's rows are played by this)."""
    outcome = run.last = case.act(run)
    assert outcome.code == case.code, outcome.text[-3000:]
    for words in case.says:
        assert words in outcome.text, f'{words!r} not in:\n{outcome.text[-3000:]}'
    if case.then is not None:
        assert case.then(run), outcome.text[-3000:]
    return outcome


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_hostile_case(case, tmp_path, data_root, finished, monkeypatch):
    play(case, Run(tmp_path, data_root, finished, monkeypatch))
