"""Hostile cases of round four (issue 30) about artifacts: a result is never
reported for data or a config it was not computed from. One row per case, in
the style of tests/test_hostile_cases.py (numbers as in the issue)."""
import glob
import json
import os
import os.path as osp
import shutil

import pytest
from PIL import Image

import dpa  # noqa: F401
from dpa.engine.config_guard import result_config
from dpa.engine.pipeline import prepare_synthetic_data
from dpa.engine.preflight import resolve_config
from dpa.models.builders import PROCESSORS
from test_hostile_cases import Case, Outcome, Run, play
from tiny import REPO, TINY, tiny_config

pytestmark = pytest.mark.usefixtures('one_thread')

VANILLA = osp.join(REPO, 'configs', 'ablations', 'dpa_tiny_vanilla.py')
QWEN_7B = osp.join(REPO, 'configs', 'dpa_qwen2_5_7b.py')
ZERO = '0' * 64


def manifest(run, stage, work_dir=None):
    with open(osp.join(work_dir or run.work_dir, stage, 'manifest.json')) as f:
        return json.load(f)


def edit_manifest(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, 'w') as f:
        json.dump(data, f)


# ---------------------------------------------------------------- 1: config record

def vanilla_on_dpa_run(run, *args):
    """The vanilla ablation pointed at a finished DPA work dir."""
    run.copy_run()
    return run.train(*args, config=VANILLA)


def retrained_as_vanilla(run):
    align, finetune = manifest(run, 'align'), manifest(run, 'finetune')
    return (glob.glob(osp.join(run.work_dir, 'align.stale-*'))
            and align['stage_config']['align']['loss']['mode'] == 'vanilla'
            and 'llm_adapter' not in align['made_from']
            and finetune['stage_config']['finetune']['loss']['mode'] == 'vanilla')


def old_manifests_trusted(run):
    """Manifests of a version that did not record the config: used as they
    are (a warning says so), as manifests without input checksums are."""
    run.copy_run()
    for stage in ('proxy', 'align', 'finetune'):
        edit_manifest(osp.join(run.work_dir, stage, 'manifest.json'),
                      lambda m: m.pop('stage_config', None))
    return run.train(config=VANILLA)


# ---------------------------------------------------------------- 2: eval skip key

def eval_rows(run, name, count, folder='rows'):
    os.makedirs(run.tmp / folder, exist_ok=True)
    with open(run.eval_data) as f:
        rows = f.readlines()[:count]
    path = str(run.tmp / folder / name)
    with open(path, 'w') as f:
        f.writelines(rows)
    return path


def eval_on_other_file(run):
    run.copy_run(('proxy', 'align', 'finetune', 'eval'))
    return run.train(options=[f"eval.data={eval_rows(run, 'other.jsonl', 3)}",
                              f'eval.image_folder={run.images}'])


def eval_file_edited(run):
    """The eval stage scored a file of 8 rows; the file now holds 2."""
    run.copy_run()
    mine = eval_rows(run, 'mine.jsonl', 8)
    options = [f'eval.data={mine}', f'eval.image_folder={run.images}']
    first = run.train(options=options)
    if '8 rows of' not in first.text:
        return Outcome(-1, first.text)
    eval_rows(run, 'mine.jsonl', 2)
    return run.train(options=options)


def eval_unchanged(run):
    run.copy_run(('proxy', 'align', 'finetune', 'eval'))
    return run.train()


# ---------------------------------------------------------------- 3: stale final model

def align_retrained_then(run, tool, *args, model=None):
    """align was trained again after finetune: the final model's projector
    is not the one the work dir holds (as after `--stage align`)."""
    run.copy_run()
    edit_manifest(osp.join(run.work_dir, 'finetune', 'manifest.json'),
                  lambda m: m['made_from']['input_checksums'].update(projector=ZERO))
    target = model or run.work_dir
    if tool == 'eval':
        return run.eval(target, *args)
    return run.tool('chat', target, '--prompt', 'What shape?', *args)


def proxy_retrained_then_eval(run):
    """proxy trained again: align is stale, so the model made from it is too."""
    run.copy_run()
    edit_manifest(osp.join(run.work_dir, 'align', 'manifest.json'),
                  lambda m: m['made_from']['input_checksums'].update(llm_adapter=ZERO))
    return run.eval(run.work_dir)


# ---------------------------------------------------------------- 5: synthetic data

def synthetic_settings_changed(run):
    """data/dpa_tiny holds the default set and the README's mixed.jsonl; a
    run with another synthetic_data setting must delete neither."""
    root = str(run.tmp / 'dpa_tiny')
    shutil.copytree(run.data_root, root)
    mine = osp.join(root, 'mixed.jsonl')
    shutil.copy(run.eval_data, mine)
    before = open(osp.join(root, 'captions.json')).read()
    out = run.tool('check_data', TINY, '--cfg-options', f'synthetic_data.root={root}',
                   'synthetic_data.num_captions=8', 'synthetic_data.image_size=32')
    made = glob.glob(osp.join(root, '*', 'synthetic_data.json'))
    ok = (osp.isfile(mine) and open(osp.join(root, 'captions.json')).read() == before
          and len(made) == 1)
    if ok:
        record = json.load(open(made[0]))
        folder = osp.dirname(made[0])
        ok = (record['settings']['num_captions'] == 8
              and len(json.load(open(osp.join(folder, 'captions.json')))) == 8
              and 'captions.json' in record['files']
              and all(osp.isfile(osp.join(folder, name)) for name in record['files']))
    return Outcome(out.code if ok else -1, out.text + f'\nmade: {made}')


# ---------------------------------------------------------------- 6: images on --resume

def resume_after_images_replaced(run, *args):
    """align stopped at its last checkpoint; then its caption images were
    replaced by black pictures of the same size."""
    root = str(run.tmp / 'data')
    shutil.copytree(run.data_root, root)
    run.copy_run(['proxy', 'align'])
    os.remove(osp.join(run.work_dir, 'align', 'manifest.json'))
    cfg = tiny_config(run.work_dir, root)
    cfg, _ = resolve_config(cfg)
    prepare_synthetic_data(cfg)
    with open(osp.join(run.work_dir, 'align', 'stage_config.json'), 'w') as f:
        json.dump(result_config(cfg, 'align', 1), f)
    for path in glob.glob(osp.join(root, 'images', 'cap_*.png')):
        with Image.open(path) as image:
            size = image.size
        Image.new('RGB', size).save(path)
    return run.tool('train', TINY, '--stage', 'align', '--resume', '--work-dir', run.work_dir,
                    '--cfg-options', f'synthetic_data.root={root}', *args)


# ---------------------------------------------------------------- 10: eval out folders

def two_tests_one_name(run):
    """tools/eval.py WD twice, on two benchmarks' test.jsonl, without --out."""
    work_dir = run.copy_run()
    first = eval_rows(run, 'test.jsonl', 4, folder='bench_a')
    second = eval_rows(run, 'test.jsonl', 2, folder='bench_b')
    outs = [run.tool('eval', work_dir, '--data', data, '--image-folder', run.images)
            for data in (first, second)]
    scored = sorted(json.load(open(path))['data'] for path in glob.glob(
        osp.join(work_dir, 'evaluation', '*', 'metrics.json')))
    ok = all(o.code == 0 for o in outs) and scored == sorted([first, second])
    return Outcome(0 if ok else -1, '\n'.join(o.text for o in outs) + f'\nscored: {scored}')


def same_test_twice(run):
    """The same file scored twice keeps its one folder."""
    work_dir = run.copy_run()
    data = eval_rows(run, 'test.jsonl', 2)
    outs = [run.tool('eval', work_dir, '--data', data, '--image-folder', run.images)
            for _ in range(2)]
    folders = os.listdir(osp.join(work_dir, 'evaluation'))
    ok = all(o.code == 0 for o in outs) and folders == ['test']
    return Outcome(0 if ok else -1, '\n'.join(o.text for o in outs) + f'\nfolders: {folders}')


# ---------------------------------------------------------------- 11: check_data, 7B config

def seven_b_data(run):
    """The 7B config's caption file under --cfg-options data_root, its
    tokenizer (a tiny one) under llm_path."""
    data_root = run.tmp / 'datasets'
    captions = data_root / 'LLaVA-Pretrain' / 'blip_laion_cc_sbu_558k.json'
    captions.parent.mkdir(parents=True)
    rows = json.load(open(osp.join(run.data_root, 'captions.json')))[:6]
    captions.write_text(json.dumps(rows))
    llm = run.tmp / 'llm'
    PROCESSORS.build(dict(type='TinyTokenizer', family='qwen2_5')).save_pretrained(str(llm))
    from transformers import Qwen2Config
    Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(llm))
    return run.tool('check_data', QWEN_7B, '--cfg-options', f'data_root={data_root}',
                    f'llm_path={llm}', f'checkpoint_root={run.tmp}', 'stages=[proxy]')


# ---------------------------------------------------------------- 18: eval of reused stages

def eval_of_reused_stages(run):
    options = [f'{stage}.from_work_dir={run.finished}' for stage in ('proxy', 'align',
                                                                     'finetune')]
    return run.train(options=options)


CASES = [
    Case('1 the vanilla ablation on a finished DPA work dir', vanilla_on_dpa_run,
         says=['stale stage(s) align, finetune', 'made by another config',
               "align.use_proxy: True -> False", "align.loss.mode: 'cmo' -> 'vanilla'",
               '--rerun-stale'],
         then=lambda r: manifest(r, 'align')['stage_config']['align']['loss']['mode'] == 'cmo'),
    Case('1 --rerun-stale trains them as the vanilla ablation',
         lambda r: vanilla_on_dpa_run(r, '--rerun-stale'), code=0,
         says=['align    trained', 'finetune trained'], then=retrained_as_vanilla),
    Case('1 manifests without a config record are used as they are', old_manifests_trusted,
         code=0, says=['align    skipped (artifact exists)']),
    Case('1 the same config skips its finished stages',
         lambda r: (r.copy_run(), r.train())[1], code=0,
         says=['proxy    skipped', 'align    skipped', 'finetune skipped']),
    Case('2 eval stage on another eval file scores it', eval_on_other_file, code=0,
         says=['eval     evaluated: 3 rows of', 'other.jsonl'],
         then=lambda r: 'skipped (scores exist)' not in r.last.text),
    Case('2 eval stage on its edited eval file scores it again', eval_file_edited, code=0,
         says=['eval     evaluated: 2 rows of', 'mine.jsonl']),
    Case('2 eval stage with nothing changed is skipped', eval_unchanged, code=0,
         says=['eval     skipped (scores exist)']),
    Case('3 tools/eval WD after align trained again', lambda r: align_retrained_then(r, 'eval'),
         says=["stage 'finetune'", 'is stale', "the projector of stage 'align' changed",
               '--rerun-stale']),
    Case('3 tools/chat WD after align trained again', lambda r: align_retrained_then(r, 'chat'),
         says=['chat error', "the projector of stage 'align' changed", '--rerun-stale']),
    Case('3 tools/eval on the final model folder after align trained again',
         lambda r: align_retrained_then(r, 'eval', model=osp.join(r.work_dir, 'finetune',
                                                                  'artifact')),
         says=["the projector of stage 'align' changed"]),
    Case('3 tools/eval WD after proxy trained again: stale through align',
         proxy_retrained_then_eval,
         says=["stage 'align', whose projector it was made from, is stale",
               "the llm_adapter of stage 'proxy' changed"]),
    Case('3 tools/eval --no-verify scores the stale model',
         lambda r: align_retrained_then(r, 'eval', '--no-verify'), code=0, says=['metrics:']),
    Case('4 proxy.from_work_dir made from another llm.init_seed',
         lambda r: r.train('--dry-run', options=[f'proxy.from_work_dir={r.finished}',
                                                 'llm.init_seed=1']),
         says=['proxy.from_work_dir', 'another `llm`', 'init_seed: 0 -> 1']),
    Case('4 align.from_work_dir made from another vision_tower.init_seed',
         lambda r: r.train('--dry-run', options=[f'proxy.from_work_dir={r.finished}',
                                                 f'align.from_work_dir={r.finished}',
                                                 'vision_tower.init_seed=2']),
         says=['align.from_work_dir', 'another `vision_tower`', 'init_seed: 0 -> 2']),
    Case('4 proxy.from_work_dir with the same llm and another attention kernel',
         lambda r: r.train('--dry-run', options=[f'proxy.from_work_dir={r.finished}',
                                                 'llm.attn_implementation=eager']),
         code=0, says=['already finished in']),
    Case('5 other synthetic_data settings delete nothing', synthetic_settings_changed, code=0,
         says=['no problems found']),
    Case('6 --resume after the caption images were replaced', resume_after_images_replaced,
         says=['image_fingerprints', '--allow-config-change']),
    Case('6 --resume --allow-config-change after the images were replaced',
         lambda r: resume_after_images_replaced(r, '--allow-config-change'), code=0,
         then=lambda r: any(k.startswith('image_fingerprints') for k in manifest(
             r, 'align')['config_changed_on_resume'])),
    Case('10 two test.jsonl files without --out', two_tests_one_name, code=0),
    Case('10 one test.jsonl scored twice keeps its folder', same_test_twice, code=0),
    Case('11 check_data on a 7B config fills {data_root}', seven_b_data, code=0,
         says=['no problems found'], then=lambda r: '{data_root}' not in r.last.text),
    Case('11 check_data on a 7B config with tiny_standin',
         lambda r: r.tool('check_data', QWEN_7B, '--cfg-options', 'tiny_standin=True',
                          f'standin_data_root={r.tmp / "standin"}'),
         code=0, says=['no problems found']),
    Case('18 eval stage after proxy, align and finetune reused from a work dir',
         eval_of_reused_stages, code=0,
         says=['reused from', 'eval     evaluated', 'final model accuracy']),
]


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_hostile_case(case, tmp_path, data_root, finished, monkeypatch):
    play(case, Run(tmp_path, data_root, finished, monkeypatch))
