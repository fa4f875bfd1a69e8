"""Bad data, interruptions, exact resume and clear errors, on the tiny default."""
import json
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from mmengine.hooks import Hook
from safetensors.torch import load_file

import dpa  # noqa: F401
from dpa.datasets.synthetic import make_synthetic_data
from dpa.engine import hooks as dpa_hooks
from dpa.artifacts import ArtifactError, read_manifest
from dpa.engine.checkpoint import CHECKSUM_SUFFIX, checkpoint_problem, latest_complete_checkpoint
from dpa.engine.hooks import TooManyBadSamples
from dpa.engine.interrupts import TrainingInterrupted
from dpa.engine.optim import NonFiniteLossError
from dpa.engine.pipeline import run_pipeline
from dpa.engine.preflight import check_config
from dpa.engine.stage_config import STAGES, stage_runner_config
from dpa.errors import ConfigError
from dpa.registry import HOOKS
from tiny import REPO, TINY, tiny_config

ARTIFACT_FILES = {'proxy': 'adapter_model.safetensors', 'align': 'projector.safetensors',
                  'finetune': 'llm/model.safetensors'}


def assert_same_artifact(stage, got_manifest, want_manifest):
    got = load_file(osp.join(got_manifest['artifact'], ARTIFACT_FILES[stage]))
    want = load_file(osp.join(want_manifest['artifact'], ARTIFACT_FILES[stage]))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def copy_finished_stages(finished, stage, tmp_path):
    work_dir, _ = finished
    for previous in STAGES[:STAGES.index(stage)]:
        shutil.copytree(osp.join(work_dir, previous), tmp_path / previous)


# ---------------------------------------------------------------- bad data

@pytest.fixture
def broken_data(tmp_path, data_root):
    """A copy of the synthetic data with a truncated, an empty and a missing image."""
    paths = make_synthetic_data(str(data_root))
    root = tmp_path / 'broken'
    shutil.copytree(osp.dirname(paths['captions']), root)
    images = root / 'images'
    png = (images / 'cap_000003.png').read_bytes()
    (images / 'cap_000003.png').write_bytes(png[:len(png) // 3])
    (images / 'cap_000010.png').write_bytes(b'')
    os.remove(images / 'cap_000020.png')
    return root


def test_check_data_lists_every_problem(tmp_path):
    from PIL import Image
    Image.new('RGB', (8, 8), (0, 0, 255)).save(tmp_path / 'ok.png')
    (tmp_path / 'empty.png').write_bytes(b'')
    png = (tmp_path / 'ok.png').read_bytes()
    (tmp_path / 'cut.png').write_bytes(png[:len(png) // 2])
    qa = [{'from': 'human', 'value': '<image>\nWhat colour?'}, {'from': 'gpt', 'value': 'blue'}]
    rows = [
        {'id': 'ok', 'image': 'ok.png', 'conversations': qa},
        {'id': 'missing', 'image': 'nope.png', 'conversations': qa},
        {'id': 'cut', 'image': 'cut.png', 'conversations': qa},
        {'id': 'empty', 'image': 'empty.png', 'conversations': qa},
        {'id': 'noconv', 'image': 'ok.png'},
        {'id': 'role', 'conversations': [{'from': 'bot', 'value': 'hi'}]},
        {'id': 'tags', 'conversations': qa},
        {'id': 'blank', 'image': 'ok.png', 'conversations': qa[:1] + [{'from': 'gpt',
                                                                       'value': ' '}]},
        {'id': 'ok', 'image': 'ok.png', 'conversations': qa},
    ]
    data = tmp_path / 'rows.jsonl'
    data.write_text('\n'.join(json.dumps(r) for r in rows[:5]) + '\n{"id": "bad json"\n'
                    + '\n'.join(json.dumps(r) for r in rows[5:]) + '\n')
    report = tmp_path / 'report.jsonl'
    result = subprocess.run([sys.executable, 'tools/check_data.py', str(data), '--image-folder',
                             str(tmp_path), '--report', str(report)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    found = {(r['row'], r['id'], r['reason']) for r in map(json.loads, report.open())}
    assert found == {
        (1, 'missing', 'missing_image'), (2, 'cut', 'unreadable_image'),
        (3, 'empty', 'zero_size_image'), (4, 'noconv', 'no_conversations'),
        (5, None, 'invalid_json'), (6, 'role', 'unknown_role'),
        (7, 'tags', 'image_tag_mismatch'), (8, 'blank', 'empty_text'),
        (9, 'ok', 'duplicate_id')}
    assert 'missing_image' in result.stdout and 'rows.jsonl:1 (id missing)' in result.stdout

    clean = tmp_path / 'clean.json'
    clean.write_text(json.dumps(rows[:1]))
    ok = subprocess.run([sys.executable, 'tools/check_data.py', str(clean), '--image-folder',
                         str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and 'no problems found' in ok.stdout


def test_check_data_of_a_config_tokenises_like_training(tmp_path, broken_data):
    long_row = {'id': 'long', 'conversations': [
        {'from': 'human', 'value': 'red ' * 300}, {'from': 'gpt', 'value': 'blue'}]}
    instructions = tmp_path / 'instructions.jsonl'
    shutil.copy(broken_data / 'instructions.jsonl', instructions)
    with open(instructions, 'a') as f:
        f.write(json.dumps(long_row) + '\n')
    report = tmp_path / 'report.jsonl'
    result = subprocess.run(
        [sys.executable, 'tools/check_data.py', TINY, '--report', str(report), '--cfg-options',
         'synthetic_data=None', f'caption_data.data_files=[{broken_data}/captions.json]',
         f'caption_data.image_folder={broken_data}/images',
         f'instruct_data.data_files=[{instructions}]',
         f'instruct_data.image_folder={broken_data}/images'],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    found = {(r['stage'], r['id'], r['reason']) for r in map(json.loads, report.open())}
    # Stage 1 reads caption text only: broken images do not concern it.
    assert found == {('align', 'cap_000003', 'unreadable_image'),
                     ('align', 'cap_000010', 'zero_size_image'),
                     ('align', 'cap_000020', 'missing_image'),
                     ('finetune', 'long', 'too_long')}


def bad_data_config(tmp_path, data_root, broken_data, **overrides):
    return tiny_config(tmp_path / 'work', data_root, **{
        'stages': ['align'], 'align.use_proxy': False, 'synthetic_data': None,
        'caption_data.data_files': [str(broken_data / 'captions.json')],
        'caption_data.image_folder': str(broken_data / 'images'), **overrides})


def test_bad_images_are_skipped_and_reported(tmp_path, data_root, broken_data):
    cfg = bad_data_config(tmp_path, data_root, broken_data, max_bad_fraction=0.1)
    [manifest] = run_pipeline(cfg)
    assert manifest['iterations'] == 16 and manifest['skipped_rows'] == 3
    with open(tmp_path / 'work' / 'align' / 'skipped_samples.jsonl') as f:
        skipped = sorted((r['id'], r['reason']) for r in map(json.loads, f))
    assert len(skipped) == manifest['skipped_rows']
    assert skipped == [('cap_000003', 'unreadable_image'), ('cap_000010', 'zero_size_image'),
                       ('cap_000020', 'missing_image')]
    [log] = [osp.join(d, f) for d, _, fs in os.walk(tmp_path / 'work' / 'align')
             for f in fs if f.endswith('.log')]
    assert 'skipped_rows: 3' in open(log).read()


def test_too_many_bad_rows_stop_the_stage(tmp_path, data_root, broken_data):
    cfg = bad_data_config(tmp_path, data_root, broken_data)  # default max_bad_fraction 0.01
    with pytest.raises(TooManyBadSamples) as err:
        run_pipeline(cfg)
    message = str(err.value)
    assert 'max_bad_fraction=0.01' in message and 'captions.json' in message
    assert any(reason in message for reason in ('missing_image', 'unreadable_image',
                                                'zero_size_image'))
    assert read_manifest(str(tmp_path / 'work'), 'align') is None


# ---------------------------------------------------------------- interruptions

@HOOKS.register_module(force=True)
class SignalAt(Hook):
    """Sends this process ``signum`` during iteration ``at``."""
    priority = 'HIGHEST'

    def __init__(self, at, signum=signal.SIGTERM):
        self.at, self.signum = at, signum

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter + 1 == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize('stage, signum', [('proxy', signal.SIGTERM), ('align', signal.SIGINT),
                                           ('finetune', signal.SIGTERM)])
def test_signal_saves_checkpoint_and_resume_is_exact(finished, data_root, tmp_path, stage,
                                                     signum):
    copy_finished_stages(finished, stage, tmp_path)
    cfg = tiny_config(tmp_path, data_root, custom_hooks=[dict(type='SignalAt', at=5,
                                                              signum=signum)])
    with pytest.raises(TrainingInterrupted) as err:
        run_pipeline(cfg, stage=stage)
    # Iteration 5 is mid optimizer step (2 micro-batches each): the stage
    # finishes the step, then saves.
    assert err.value.iteration == 6 and err.value.signum == signum
    assert err.value.checkpoint == str(tmp_path / stage / 'iter_6.pth')
    assert latest_complete_checkpoint(str(tmp_path / stage)) == err.value.checkpoint
    assert read_manifest(str(tmp_path), stage) is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    [resumed] = run_pipeline(tiny_config(tmp_path, data_root), stage=stage, resume=True)
    reference = {m['stage']: m for m in finished[1]}[stage]
    for key in ('iterations', 'first_loss', 'last_loss'):
        assert resumed[key] == reference[key], key
    assert_same_artifact(stage, resumed, reference)


@HOOKS.register_module(force=True)
class SignalWithWorkersAt(SignalAt):
    """Sends ``signum`` to this process and its DataLoader workers during
    iteration ``at``, as a scheduler signals the whole job."""

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter + 1 == self.at:
            workers = runner.train_loop.dataloader_iterator._iterator._workers
            assert len(workers) == 2
            for worker in workers:
                os.kill(worker.pid, self.signum)
            os.kill(os.getpid(), self.signum)


def test_signal_with_loader_workers_saves_and_resume_is_exact(finished, data_root, tmp_path):
    """Two persistent, prefetching workers (stage 1, the fastest): they outlive
    the SIGTERM, the stage saves, and the resumed stage (workers again) equals
    the in-process run."""
    workers = {'proxy.num_workers': 2,
               'dataloader': dict(persistent_workers=True, prefetch_factor=2)}
    cfg = tiny_config(tmp_path, data_root, **workers,
                      custom_hooks=[dict(type='SignalWithWorkersAt', at=5)])
    assert stage_runner_config(cfg, 'proxy').train_dataloader.persistent_workers
    with pytest.raises(TrainingInterrupted) as err:
        run_pipeline(cfg, stage='proxy')
    assert err.value.iteration == 6 and err.value.signum == signal.SIGTERM

    [resumed] = run_pipeline(tiny_config(tmp_path, data_root, **workers), stage='proxy',
                             resume=True)
    reference = {m['stage']: m for m in finished[1]}['proxy']
    for key in ('iterations', 'first_loss', 'last_loss'):
        assert resumed[key] == reference[key], key
    assert_same_artifact('proxy', resumed, reference)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_cli_prints_the_resume_command_on_a_signal(tmp_path, data_root, signum):
    # As a terminal's Ctrl-C or a scheduler does: the signal reaches the whole
    # process group, DataLoader workers included.
    process = subprocess.Popen(
        [sys.executable, 'tools/train.py', TINY, '--stage', 'proxy', '--work-dir',
         str(tmp_path), '--cfg-options', f'synthetic_data.root={data_root}',
         'proxy.max_epochs=100', 'proxy.num_workers=2'],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if 'Iter(train)' in line:
            os.killpg(process.pid, signum)
            break
    output += process.stdout.readlines()
    assert process.wait(timeout=120) == 128 + signum, ''.join(output)[-3000:]
    text = ''.join(output)
    assert f'interrupted by {signal.Signals(signum).name}' in text
    assert f'--work-dir {tmp_path}' in text and text.rstrip().endswith('--resume')
    assert latest_complete_checkpoint(str(tmp_path / 'proxy')) is not None


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(finished, data_root, tmp_path,
                                                                 monkeypatch):
    copy_finished_stages(finished, 'align', tmp_path)
    real_replace = os.replace

    def killed_at_iteration_16(src, dst):
        if str(dst).endswith('iter_16.pth'):
            raise KeyboardInterrupt('killed mid-write')
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', killed_at_iteration_16)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_config(tmp_path, data_root), stage='align')
    monkeypatch.setattr(os, 'replace', real_replace)
    assert not osp.exists(tmp_path / 'align' / 'iter_16.pth')
    # A truncated checkpoint (from a writer without renames) is not trusted either.
    (tmp_path / 'align' / 'iter_12.pth').write_bytes(b'PK\x03\x04 truncated')
    assert latest_complete_checkpoint(str(tmp_path / 'align')).endswith('iter_8.pth')

    [resumed] = run_pipeline(tiny_config(tmp_path, data_root), stage='align', resume=True)
    assert_same_artifact('align', resumed, {m['stage']: m for m in finished[1]}['align'])


def test_kill_while_writing_the_artifact_leaves_no_manifest(finished, data_root, tmp_path,
                                                            monkeypatch):
    copy_finished_stages(finished, 'align', tmp_path)

    def killed(*args):
        raise KeyboardInterrupt('killed while writing the artifact')

    monkeypatch.setattr(dpa_hooks, 'save_file', killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_config(tmp_path, data_root), stage='align')
    assert read_manifest(str(tmp_path), 'align') is None
    assert not osp.exists(tmp_path / 'align' / 'artifact')
    monkeypatch.undo()
    [manifest] = run_pipeline(tiny_config(tmp_path, data_root), stage='align')
    assert not manifest['skipped']
    assert_same_artifact('align', manifest, {m['stage']: m for m in finished[1]}['align'])


# ---------------------------------------------------------------- non-finite loss

@HOOKS.register_module(force=True)
class PoisonBatchAt(Hook):
    """Turns the images of iteration ``at``'s batch into NaN."""

    def __init__(self, at):
        self.at = at

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter + 1 == self.at:
            data_batch['pixel_values'] = data_batch['pixel_values'] * float('nan')


def test_nonfinite_loss_stops_naming_iteration_and_checkpoint(finished, data_root, tmp_path):
    copy_finished_stages(finished, 'align', tmp_path)
    cfg = tiny_config(tmp_path, data_root, custom_hooks=[dict(type='PoisonBatchAt', at=11)])
    with pytest.raises(NonFiniteLossError) as err:
        run_pipeline(cfg, stage='align')
    message = str(err.value)
    assert 'at iteration 11' in message
    assert f"last good checkpoint: {tmp_path / 'align' / 'iter_8.pth'}" in message
    assert 'skip_nonfinite_steps' in message


def test_nonfinite_steps_can_be_skipped_and_counted(finished, data_root, tmp_path):
    copy_finished_stages(finished, 'align', tmp_path)
    cfg = tiny_config(tmp_path, data_root, skip_nonfinite_steps=True,
                      custom_hooks=[dict(type='PoisonBatchAt', at=11)])
    [manifest] = run_pipeline(cfg, stage='align')
    assert manifest['nonfinite_skipped'] == 1 and manifest['iterations'] == 16
    projector = load_file(osp.join(manifest['artifact'], 'projector.safetensors'))
    assert all(torch.isfinite(v).all() for v in projector.values())


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize('overrides, message', [
    ({'llm.config.num_hidden_layers': 3}, "would use the llm_adapter of stage 'proxy'"),
    ({'vision_tower.config.hidden_size': 32}, 'made with vision_tower='),
    ({'align.checkpoint_interval': 7}, 'align.checkpoint_interval=7 must be a multiple of the 2'),
])
def test_artifacts_made_from_other_models_are_refused(finished, data_root, tmp_path, overrides,
                                                      message):
    copy_finished_stages(finished, 'finetune', tmp_path)
    stage = 'finetune' if 'vision_tower.config.hidden_size' in overrides else 'align'
    with pytest.raises(ConfigError, match=message):
        run_pipeline(tiny_config(tmp_path, data_root, **overrides), stage=stage)


# ---------------------------------------------------------------- integrity

def flip_bytes(path, at=0.5, count=16):
    data = bytearray(open(path, 'rb').read())
    start = int(len(data) * at)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    open(path, 'wb').write(bytes(data))


def current_log_lines():
    """What mmengine's current logger logs from now on."""
    import logging
    from mmengine.logging import MMLogger
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    MMLogger.get_current_instance().addHandler(Collect())
    return lines


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_log_line(finished, data_root, tmp_path):
    copy_finished_stages(finished, 'align', tmp_path)
    cfg = tiny_config(tmp_path, data_root, custom_hooks=[dict(type='SignalAt', at=13)])
    with pytest.raises(TrainingInterrupted) as err:
        run_pipeline(cfg, stage='align')
    newest = err.value.checkpoint
    assert newest.endswith('iter_14.pth') and osp.isfile(newest + CHECKSUM_SUFFIX)
    # torch.load does not check the zip CRCs: this loaded silently before.
    flip_bytes(newest)
    lines = current_log_lines()
    assert latest_complete_checkpoint(str(tmp_path / 'align')).endswith('iter_8.pth')
    assert any(f'skipping checkpoint {newest}' in line and 'sha256' in line for line in lines)

    [resumed] = run_pipeline(tiny_config(tmp_path, data_root), stage='align', resume=True)
    assert_same_artifact('align', resumed, {m['stage']: m for m in finished[1]}['align'])


def test_a_checkpoint_without_sidecar_is_checked_by_its_zip_crcs(tmp_path):
    path = str(tmp_path / 'iter_4.pth')
    torch.save({'weight': torch.arange(4096, dtype=torch.float32)}, path)
    assert checkpoint_problem(path) is None
    flip_bytes(path, at=0.4)
    assert 'CRC' in checkpoint_problem(path) or 'zip' in checkpoint_problem(path)


def test_corrupt_manifests_and_artifacts_name_the_file_and_the_rerun(finished, data_root,
                                                                     tmp_path):
    copy_finished_stages(finished, 'align', tmp_path)
    manifest = tmp_path / 'proxy' / 'manifest.json'
    good = manifest.read_text()
    sys.path.insert(0, osp.join(REPO, 'tools'))
    import train
    for content, problem in (('{"artifact": "proxy/arti', 'is not a readable manifest'),
                             ('{}', 'is not a complete manifest (missing')):
        manifest.write_text(content)
        with pytest.raises(ArtifactError) as err:
            run_pipeline(tiny_config(tmp_path, data_root), stage='align')
        assert f'{manifest} {problem}' in str(err.value)
        with pytest.raises(SystemExit) as exit_:
            train.main([TINY, '--stage', 'align', '--work-dir', str(tmp_path), '--cfg-options',
                        f'synthetic_data.root={data_root}'])
        assert problem in str(exit_.value)
        assert (f'python tools/train.py {TINY} --stage proxy --work-dir {tmp_path}'
                in str(exit_.value))
    manifest.write_text(good)
    flip_bytes(tmp_path / 'proxy' / 'artifact' / 'adapter_model.safetensors', count=1)
    with pytest.raises(ArtifactError, match='adapter_model.safetensors does not match the sha256'):
        run_pipeline(tiny_config(tmp_path, data_root), stage='align')


def test_manifests_hold_paths_relative_to_the_work_dir(finished, data_root, tmp_path):
    work_dir, _ = finished
    raw = json.load(open(osp.join(work_dir, 'finetune', 'manifest.json')))
    assert raw['artifact'] == osp.join('finetune', 'artifact')
    assert raw['made_from']['projector'] == osp.join('align', 'artifact')
    assert set(raw['checksums']) >= {'projector.safetensors', 'llm/model.safetensors'}

    # A moved copy: the next stage uses the copy's own artifacts.
    copy = tmp_path / 'copy'
    shutil.copytree(work_dir, copy)
    moved = tmp_path / 'moved'
    os.rename(copy, moved)
    cfg = tiny_config(moved, data_root)
    check_config(cfg, ['finetune'])
    runner_cfg = stage_runner_config(cfg, 'finetune')
    assert runner_cfg.model.projector_weights == str(moved / 'align' / 'artifact' /
                                                     'projector.safetensors')
    assert read_manifest(str(moved), 'proxy')['artifact'] == str(moved / 'proxy' / 'artifact')

    # A manifest of an older version, with absolute paths to the original.
    old = json.load(open(moved / 'align' / 'manifest.json'))
    old['artifact'] = osp.join(work_dir, 'align', 'artifact')
    (moved / 'align' / 'manifest.json').write_text(json.dumps(old))
    assert read_manifest(str(moved), 'align')['artifact'] == str(moved / 'align' / 'artifact')
    assert read_manifest(str(work_dir), 'align')['artifact'] == osp.join(work_dir, 'align',
                                                                         'artifact')


def test_a_row_skipped_twice_in_one_batch_is_listed_once(tmp_path):
    hook = dpa_hooks.DPAHook('finetune', 'model', str(tmp_path), {}, max_bad_fraction=1.0)
    hook.skipped_path, hook.dataset_size = str(tmp_path / 'skipped_samples.jsonl'), 10
    record = dict(file='rows.jsonl', row=3, id='x', reason='missing_image', detail='gone')
    # Rows 2 and 3 are bad: the sample at 2 skipped both, the one at 3 skipped 3 again.
    other = dict(record, row=2)
    hook.before_train_iter(None, 0, dict(skipped=[other, record, record]))
    hook.before_train_iter(None, 1, dict(skipped=[record]))
    lines = open(hook.skipped_path).read().splitlines()
    assert [json.loads(line)['row'] for line in lines] == [2, 3]
    assert hook.stage_summary()['skipped_rows'] == len(lines)
