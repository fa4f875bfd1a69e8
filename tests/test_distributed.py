"""Scale: the launch scripts, the world size each launcher announces, the
strategies' runner configs, and a real two-process run (torchrun, gloo) of
the three stages on CPU."""
import glob
import json
import os
import os.path as osp
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from safetensors.torch import load_file

import dpa  # noqa: F401
from dpa.datasets.synthetic import make_synthetic_data
from dpa.engine.distributed import apply_strategy, world_size
from dpa.errors import ConfigError
from dpa.engine.preflight import check_config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIXTURES = osp.join(REPO, 'tests', 'fixtures')
STRATEGIES = osp.join(REPO, 'configs', '_base_', 'strategies')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- #
# Two processes on CPU
# --------------------------------------------------------------------------- #

def dist_train(config, work_dir, data_root, *args, **env):
    """tools/dist_train.sh CONFIG 2 on the CPU (gloo)."""
    env = dict(os.environ, PYTHON=sys.executable, MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([FIXTURES, os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1', **env)
    return subprocess.run(
        ['bash', osp.join(REPO, 'tools', 'dist_train.sh'), osp.join(FIXTURES, config), '2',
         '--work-dir', str(work_dir), '--cfg-options', f'synthetic_data.root={data_root}',
         *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    # Made beforehand: ranks making it at the same time can remove each
    # other's finished copy (make_synthetic_data replaces the whole root).
    root = tmp_path_factory.mktemp('dist') / 'data'
    spec = Config.fromfile(osp.join(FIXTURES, 'dist_tiny.py'),
                           import_custom_modules=False).synthetic_data
    make_synthetic_data(**dict(spec, root=str(root)))
    return root


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory, data_dir):
    """tools/dist_train.sh on the tiny default with 2 processes; every rank
    writes what it saw (tests/fixtures/dist_probe.py)."""
    work_dir = tmp_path_factory.mktemp('dist')
    result = dist_train('dist_tiny.py', work_dir / 'work', data_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    probes = {}
    for stage in ('proxy', 'align', 'finetune'):
        for rank in (0, 1):
            with open(work_dir / 'work' / 'probe' / f'{stage}_rank{rank}.json') as f:
                probes[stage, rank] = json.load(f)
    return result, probes, work_dir / 'work'


@pytest.mark.parametrize('stage, batch, accumulation', [
    ('proxy', 2, 2), ('align', 2, 2), ('finetune', 1, 1)])
def test_two_processes_keep_the_global_batch(two_process_run, stage, batch, accumulation):
    result, probes, _ = two_process_run
    cfg = Config.fromfile(osp.join(FIXTURES, 'dist_tiny.py'), import_custom_modules=False)
    global_batch = cfg[stage].global_batch_size
    assert global_batch == batch * 2 * accumulation
    assert (f'[{stage}] {"8" if stage == "finetune" else "16"} samples, batch {batch} x 2 '
            f'processes x {accumulation} accumulation = global batch {global_batch}'
            ) in result.stdout + result.stderr
    ranks = [probes[stage, rank] for rank in (0, 1)]
    for probe in ranks:
        assert probe['world_size'] == 2
        assert probe['model_wrapper'] == 'MMDistributedDataParallel'
        assert (probe['batch_size'], probe['accumulation']) == (batch, accumulation)
        assert len(probe['losses']) == len(probe['indices']) // batch
    # The ranks read disjoint halves of the data, so one optimizer step
    # consumes the global batch of distinct samples.
    first, second = ranks[0]['indices'], ranks[1]['indices']
    assert sorted(first + second) == list(range(ranks[0]['dataset_size']))
    per_rank = batch * accumulation
    for start in range(0, len(first), per_rank):
        step = first[start:start + per_rank] + second[start:start + per_rank]
        assert len(set(step)) == global_batch


@pytest.mark.parametrize('stage', ['proxy', 'align', 'finetune'])
def test_two_processes_train_one_model(two_process_run, stage):
    _, probes, _ = two_process_run
    rank0, rank1 = probes[stage, 0], probes[stage, 1]
    assert rank0['before'] == rank1['before']  # the same initial weights
    assert rank0['after'] != rank0['before']  # the weights moved
    assert rank0['all_after'] == [rank0['after'], rank1['after']]
    assert rank0['after'] == rank1['after']  # gradients were averaged across ranks
    assert all(loss == loss and loss < 20 for loss in rank0['losses'] + rank1['losses'])


def test_image_free_batches_do_not_stall_the_projector(two_process_run):
    """A stage-3 micro-batch without images leaves the projector out of that
    process's graph; DDP must not wait for its gradients (find_unused_parameters)."""
    _, probes, _ = two_process_run
    without_image = [not with_image for rank in (0, 1)
                     for with_image in probes['finetune', rank]['with_image'][:-1]]
    assert any(without_image), 'the fixture data no longer has an image-free micro-batch'


# --------------------------------------------------------------------------- #
# FSDP2 on two processes (configs/_base_/strategies/fsdp.py)
# --------------------------------------------------------------------------- #

@pytest.fixture(scope='module')
def fsdp_run(tmp_path_factory, data_dir):
    """The same stages as ``two_process_run``, sharded with FSDP2 and with
    activation checkpointing (tests/fixtures/dist_tiny_fsdp.py)."""
    work_dir = tmp_path_factory.mktemp('fsdp') / 'work'
    result = dist_train('dist_tiny_fsdp.py', work_dir, data_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, work_dir


def artifact_tensors(work_dir, stage):
    """Every tensor of a stage's artifact, by file and key."""
    root = osp.join(work_dir, stage, 'artifact')
    files = sorted(glob.glob(osp.join(root, '**', '*.safetensors'), recursive=True))
    assert files, f'no safetensors in {root}'
    return {(osp.relpath(f, root), key): value for f in files
            for key, value in load_file(f).items()}


@pytest.mark.parametrize('stage', ['proxy', 'align', 'finetune'])
def test_fsdp_artifacts_equal_the_ddp_ones(two_process_run, fsdp_run, stage):
    """Gathered from shards on rank 0, the adapter, the projector, the native
    model and the hf_llava export are what DDP writes."""
    ddp = artifact_tensors(two_process_run[2], stage)
    fsdp = artifact_tensors(fsdp_run[1], stage)
    assert fsdp.keys() == ddp.keys()
    for key, value in fsdp.items():
        assert value.dtype == ddp[key].dtype and value.shape == ddp[key].shape, key
        torch.testing.assert_close(value, ddp[key], rtol=0, atol=1e-5, msg=str(key))
    if stage == 'finetune':
        assert any(f.startswith('hf_llava') for f, _ in fsdp)


def test_fsdp_and_ddp_train_anyres_alike(tmp_path, data_dir):
    """AnyRes under both strategies: tiles and image_newline (a projector
    parameter outside the decoder layers) train to the same artifacts."""
    runs = {}
    for name, config in (('ddp', 'dist_tiny_anyres.py'), ('fsdp', 'dist_tiny_fsdp_anyres.py')):
        result = dist_train(config, tmp_path / name, data_dir)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[name] = {stage: artifact_tensors(tmp_path / name, stage)
                      for stage in ('align', 'finetune')}
    for stage in ('align', 'finetune'):
        ddp, fsdp = runs['ddp'][stage], runs['fsdp'][stage]
        assert fsdp.keys() == ddp.keys()
        for key, value in fsdp.items():
            torch.testing.assert_close(value, ddp[key], rtol=0, atol=1e-5, msg=str(key))
    newline = ('projector.safetensors', 'image_newline')
    # Trained on in stage 3, and exported.
    assert not torch.equal(runs['ddp']['align'][newline], runs['ddp']['finetune'][newline])
    assert ('hf_llava/model.safetensors', 'image_newline') in runs['fsdp']['finetune']


def test_the_fsdp_comparison_has_steps_where_one_rank_alone_has_an_image(two_process_run):
    """Such a step, under FSDP2, must not desynchronise the ranks' collectives
    (the vision tower runs on one rank only; the projector has a gradient on
    one only) and must give the projector DDP's update."""
    _, probes, _ = two_process_run
    steps = list(zip(probes['finetune', 0]['with_image'], probes['finetune', 1]['with_image']))
    assert any(a != b for a, b in steps), steps


@pytest.mark.parametrize('stage, batch, accumulation', [
    ('proxy', 2, 2), ('align', 2, 2), ('finetune', 1, 1)])
def test_fsdp_keeps_the_global_batch(fsdp_run, stage, batch, accumulation):
    result, _ = fsdp_run
    global_batch = batch * 2 * accumulation
    assert (f'[{stage}] {"8" if stage == "finetune" else "16"} samples, batch {batch} x 2 '
            f'processes x {accumulation} accumulation = global batch {global_batch}'
            ) in result.stdout + result.stderr


def test_fsdp_checkpoints_are_sharded(fsdp_run):
    """iter_N.dcp holds each rank's shard of the weights and optimizer state;
    iter_N.pth (written last) holds the rest, without weights."""
    stage_dir = fsdp_run[1] / 'finetune'
    for iteration in (2, 4):
        shards = stage_dir / f'iter_{iteration}.dcp'
        assert sorted(os.listdir(shards)) == ['.metadata', '__0_0.distcp', '__1_0.distcp']
        checkpoint = torch.load(stage_dir / f'iter_{iteration}.pth', weights_only=False)
        assert not checkpoint['state_dict'] and 'optimizer' not in checkpoint
        assert checkpoint['meta']['iter'] == iteration


def test_fsdp_resume_after_sigterm_is_exact(fsdp_run, data_dir, tmp_path):
    """Stage 3 (the whole LLM trains) stopped by SIGTERM after its first
    optimizer step and resumed from the sharded checkpoint ends bit-identical
    to the uninterrupted run."""
    _, finished = fsdp_run
    work_dir = tmp_path / 'work'
    for stage in ('proxy', 'align'):
        shutil.copytree(finished / stage, work_dir / stage)
    args = ('--stage', 'finetune')
    stopped = dist_train('dist_tiny_fsdp.py', work_dir, data_dir, *args,
                         DPA_TEST_SIGTERM_AT='finetune:1')
    assert stopped.returncode != 0
    assert "stage 'finetune' interrupted by SIGTERM after iteration 1" in stopped.stderr
    assert (work_dir / 'finetune' / 'iter_1.pth').exists()
    assert not (work_dir / 'finetune' / 'manifest.json').exists()
    resumed = dist_train('dist_tiny_fsdp.py', work_dir, data_dir, *args, '--resume')
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert 'resumed epoch: 0, iter: 1' in resumed.stdout + resumed.stderr
    expected = artifact_tensors(finished, 'finetune')
    got = artifact_tensors(work_dir, 'finetune')
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)


# LoRA stage 3 (finetune.lora, issue 31), with dropout and its own projector lr.
LORA_OPTIONS = ('finetune.lora.r=4', 'finetune.lora.lora_alpha=8',
                'finetune.lora.lora_dropout=0.05', 'finetune.lora.target_modules=all-linear',
                'finetune.projector_lr=1e-3')


@pytest.fixture(scope='module')
def lora_runs(two_process_run, fsdp_run, data_dir, tmp_path_factory):
    """The LoRA stage 3 on two processes, under DDP and FSDP2, each on its
    strategy's stages 1-2."""
    runs = {}
    for name, config, finished in (('ddp', 'dist_tiny.py', two_process_run[2]),
                                   ('fsdp', 'dist_tiny_fsdp.py', fsdp_run[1])):
        work_dir = tmp_path_factory.mktemp(f'lora_{name}') / 'work'
        for stage in ('proxy', 'align'):
            shutil.copytree(finished / stage, work_dir / stage)
        result = dist_train(config, work_dir, data_dir, *LORA_OPTIONS, '--stage', 'finetune')
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[name] = work_dir
    return runs


def test_lora_finetune_under_fsdp_equals_ddp(lora_runs):
    """Adapters inside the sharded decoder layers, the projector in the root:
    gathered on rank 0 and merged, the artifact is the DDP one."""
    ddp = artifact_tensors(lora_runs['ddp'], 'finetune')
    fsdp = artifact_tensors(lora_runs['fsdp'], 'finetune')
    assert fsdp.keys() == ddp.keys()
    assert ('adapter/adapter_model.safetensors',
            'base_model.model.model.layers.0.mlp.down_proj.lora_B.weight') in fsdp
    assert not any('lora' in key for f, key in fsdp if f.startswith(('llm', 'hf_llava')))
    for key, value in fsdp.items():
        torch.testing.assert_close(value, ddp[key], rtol=0, atol=1e-5, msg=str(key))


def test_lora_finetune_fsdp_resume_after_sigterm_is_exact(lora_runs, fsdp_run, data_dir,
                                                          tmp_path):
    work_dir = tmp_path / 'work'
    for stage in ('proxy', 'align'):
        shutil.copytree(fsdp_run[1] / stage, work_dir / stage)
    args = (*LORA_OPTIONS, '--stage', 'finetune')
    stopped = dist_train('dist_tiny_fsdp.py', work_dir, data_dir, *args,
                         DPA_TEST_SIGTERM_AT='finetune:1')
    assert "stage 'finetune' interrupted by SIGTERM after iteration 1" in stopped.stderr
    resumed = dist_train('dist_tiny_fsdp.py', work_dir, data_dir, *args, '--resume')
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    expected = artifact_tensors(lora_runs['fsdp'], 'finetune')
    got = artifact_tensors(work_dir, 'finetune')
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_dist_train_passes_the_multinode_settings(tmp_path):
    fake_python = tmp_path / 'python'
    fake_python.write_text('#!/usr/bin/env bash\necho "$@" > "$(dirname "$0")/args"\n')
    fake_python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake_python), NNODES='2', NODE_RANK='1',
               MASTER_ADDR='10.0.0.1', MASTER_PORT='29700')
    subprocess.run(['bash', osp.join(REPO, 'tools', 'dist_train.sh'), 'configs/x.py', '8',
                    '--stage', 'align'], check=True, env=env)
    args = (tmp_path / 'args').read_text().split()
    assert args[:2] == ['-m', 'torch.distributed.run']
    for option in ('--nnodes=2', '--node_rank=1', '--master_addr=10.0.0.1',
                   '--master_port=29700', '--nproc_per_node=8'):
        assert option in args
    assert args[-5:] == ['configs/x.py', '--launcher', 'pytorch', '--stage', 'align']


def test_slurm_train_runs_one_task_per_gpu(tmp_path):
    fake_srun = tmp_path / 'srun'
    fake_srun.write_text('#!/usr/bin/env bash\necho "$@" > "$(dirname "$0")/args"\n')
    fake_srun.chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', GPUS='16',
               SRUN_ARGS='--qos=high --time=72:00:00')
    subprocess.run(['bash', osp.join(REPO, 'tools', 'slurm_train.sh'), 'gpu', 'dpa',
                    'configs/x.py', '--resume'], check=True, env=env)
    args = (tmp_path / 'args').read_text().split()
    for option in ('-p', 'gpu', '--job-name=dpa', '--ntasks=16', '--ntasks-per-node=8',
                   '--gres=gpu:8', '--qos=high', '--time=72:00:00'):
        assert option in args
    assert args[-4:] == ['configs/x.py', '--launcher', 'slurm', '--resume']


@pytest.mark.parametrize('script', ['dist_train.sh', 'slurm_train.sh'])
def test_launch_scripts_explain_their_usage(script):
    result = subprocess.run(['bash', osp.join(REPO, 'tools', script)], capture_output=True,
                            text=True)
    assert result.returncode == 2 and 'usage:' in result.stderr


# --------------------------------------------------------------------------- #
# World size and strategies
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize('launcher, variable', [
    ('pytorch', 'WORLD_SIZE'), ('slurm', 'SLURM_NTASKS'), ('mpi', 'OMPI_COMM_WORLD_SIZE')])
def test_world_size_is_read_from_the_launcher(monkeypatch, launcher, variable):
    monkeypatch.setenv(variable, '16')
    assert world_size(launcher) == 16
    assert world_size('none') == 1


def test_slurm_world_size_sets_the_accumulation(monkeypatch, tmp_path):
    """The global batch holds when Slurm, not torchrun, starts the processes."""
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'dpa_tiny.py'))
    cfg.merge_from_dict(dict(work_dir=str(tmp_path), launcher='slurm'))
    monkeypatch.setenv('SLURM_NTASKS', '3')
    with pytest.raises(ConfigError, match='batch_size x processes = 12'):
        check_config(cfg, ['proxy'])


def runner_cfg():
    return dict(model=dict(type='LlavaDPAModel'), optim_wrapper=dict(
        type='OptimWrapper', accumulative_counts=4,
        optimizer=dict(type='AdamW', lr=4e-5), clip_grad=dict(max_norm=1.0)))


def strategy_config(name):
    cfg = Config.fromfile(osp.join(STRATEGIES, name))
    cfg.merge_from_dict(dict(launcher='pytorch', mixed_precision='bfloat16'))
    return cfg


def test_ddp_default_trains_under_bf16_autocast():
    out = apply_strategy(runner_cfg(), strategy_config('ddp.py'), 'align', accumulation=4)
    assert 'runner_type' not in out and 'strategy' not in out
    # bf16 autocast without loss scaling, on any device, with the guard.
    assert out['optim_wrapper']['type'] == 'GuardedAutocastOptimWrapper'
    assert out['optim_wrapper']['dtype'] == 'bfloat16'
    assert out['optim_wrapper']['accumulative_counts'] == 4
    assert out['find_unused_parameters'] is False
    # On a machine without a GPU, DDP wraps a CPU model.
    assert out['model_wrapper_cfg']['device_ids'] is None
    finetune = apply_strategy(runner_cfg(), strategy_config('ddp.py'), 'finetune', 4)
    assert finetune['find_unused_parameters'] is True


@pytest.mark.parametrize('name, zero_stage', [('deepspeed_zero2.py', 2),
                                              ('deepspeed_zero3.py', 3)])
def test_deepspeed_gets_the_stage_accumulation_clipping_and_precision(name, zero_stage):
    out = apply_strategy(runner_cfg(), strategy_config(name), 'finetune', accumulation=4)
    assert out['runner_type'] == 'FlexibleRunner'
    strategy = out['strategy']
    assert strategy['type'] == 'DeepSpeedStrategy'
    assert strategy['zero_optimization']['stage'] == zero_stage
    assert strategy['gradient_accumulation_steps'] == 4
    assert strategy['gradient_clipping'] == 1.0
    assert strategy['bf16'] == dict(enabled=True)
    assert out['optim_wrapper'] == dict(type='DeepSpeedOptimWrapper',
                                        optimizer=dict(type='AdamW', lr=4e-5))


def test_deepspeed_keeps_the_projector_learning_rate():
    """`projector_lr` (a LoRA stage 3's) is a parameter group DeepSpeed's
    optimizer gets too."""
    cfg = runner_cfg()
    cfg['optim_wrapper'].update(constructor='ProjectorLrConstructor',
                                paramwise_cfg=dict(projector_lr=2e-5))
    out = apply_strategy(cfg, strategy_config('deepspeed_zero2.py'), 'finetune', accumulation=4)
    assert out['optim_wrapper'] == dict(
        type='DeepSpeedOptimWrapper', optimizer=dict(type='AdamW', lr=4e-5),
        constructor='ProjectorLrConstructor', paramwise_cfg=dict(projector_lr=2e-5))


def test_fsdp2_gets_mixed_precision_and_keeps_the_optimizer_wrapper():
    cfg = strategy_config('fsdp.py')
    cfg.trainable_dtype = 'float32'
    out = apply_strategy(runner_cfg(), cfg, 'finetune', accumulation=4)
    assert out['runner_type'] == 'FSDPRunner' and 'strategy' not in out
    assert out['model_wrapper_cfg'] == dict(type='FullyShardedModel', param_dtype='bfloat16',
                                            reduce_dtype='float32', reshard_after_forward=True)
    # Accumulation, clipping and the guard are the DDP ones; no autocast.
    assert out['optim_wrapper']['type'] == 'OptimWrapper'
    assert out['optim_wrapper']['accumulative_counts'] == 4
    assert out['optim_wrapper']['clip_grad'] == dict(max_norm=1.0)
    assert out['model']['trainable_dtype'] == 'float32'
    cfg.mixed_precision = None  # the CPU: float32 compute
    assert apply_strategy(runner_cfg(), cfg, 'finetune', 4)['model_wrapper_cfg'][
        'param_dtype'] is None


def test_fsdp2_in_one_process_trains_unsharded():
    cfg = strategy_config('fsdp.py')
    cfg.launcher = 'none'
    out = apply_strategy(runner_cfg(), cfg, 'finetune', accumulation=4)
    assert 'runner_type' not in out and 'model_wrapper_cfg' not in out
    assert out['optim_wrapper']['type'] == 'GuardedAutocastOptimWrapper'


def test_tiny_fsdp_config_selects_fsdp2():
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'dpa_tiny_fsdp.py'))
    assert cfg.strategy == dict(type='FSDP2Strategy', reshard_after_forward=True)
    assert cfg.get('mixed_precision') is None and cfg.llm.torch_dtype == 'float32'


def tiny_with_strategy(tmp_path, name, **keys):
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'dpa_tiny.py'))
    cfg.merge_from_dict(dict(work_dir=str(tmp_path)))
    cfg.merge_from_dict(Config.fromfile(osp.join(STRATEGIES, name)).to_dict())
    cfg.merge_from_dict(keys)
    return cfg


def test_zero3_is_refused_before_loading(tmp_path):
    """Stage artifacts are written from rank 0's parameters: under ZeRO-3
    they would be incomplete (the gather needs a GPU to be built), so the run
    stops before it starts and names FSDP2."""
    cfg = tiny_with_strategy(tmp_path, 'deepspeed_zero3.py')
    with pytest.raises(ConfigError, match='GatheredParameters.*strategies/fsdp.py'):
        check_config(cfg, ['proxy'])
    cfg.strategy = Config.fromfile(osp.join(STRATEGIES, 'deepspeed_zero2.py')).strategy
    check_config(cfg, ['proxy'])


@pytest.mark.parametrize('keys, message', [
    (dict(mixed_precision='float16'), "mixed_precision='float16' under FSDP2Strategy"),
    (dict(strategy=dict(min_num_params=10)), r"FSDP2Strategy has no key\(s\) \['min_num_params'\]"),
    (dict(strategy=dict(type='FSDPStrategy')), "'FSDPStrategy' \\(mmengine's FSDP1\\)"),
])
def test_fsdp2_settings_are_checked(tmp_path, monkeypatch, keys, message):
    monkeypatch.setenv('WORLD_SIZE', '2')
    cfg = tiny_with_strategy(tmp_path, 'fsdp.py', **{'launcher': 'pytorch', **keys})
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, ['proxy'])
    check_config(tiny_with_strategy(tmp_path, 'fsdp.py', launcher='pytorch'), ['proxy'])


@pytest.mark.parametrize('keys, message', [
    (dict(strategy=dict(type='ColossalAIStrategy')), "strategy.type='ColossalAIStrategy'"),
    (dict(mixed_precision='bf16'), "mixed_precision='bf16'"),
])
def test_unknown_strategy_or_precision_is_a_config_error(tmp_path, keys, message):
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'dpa_tiny.py'))
    cfg.merge_from_dict(dict(work_dir=str(tmp_path), **keys))
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, ['proxy'])


EXIT_PROBE = '''
import logging, logging.handlers, sys
import torch.distributed as dist
from dpa.engine.distributed import exit_distributed_run
dist.init_process_group('gloo', rank=0, world_size=1, init_method='file://' + sys.argv[2])
log = logging.getLogger('probe')
# held in memory until logging.shutdown()
log.addHandler(logging.handlers.MemoryHandler(100, target=logging.FileHandler(sys.argv[1])))
log.warning('log line')
print('stdout line')
exit_distributed_run()
raise SystemExit(3)  # not reached
'''


def test_a_distributed_run_ends_with_its_output_flushed(tmp_path):
    """tools/train.py ends a multi-process run with os._exit (past gloo's
    teardown): status 0, the buffered stdout and the log file complete;
    nothing after it runs."""
    log = tmp_path / 'run.log'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'}  # a buffered pipe
    result = subprocess.run([sys.executable, '-c', EXIT_PROBE, str(log), str(tmp_path / 'store')],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == 'stdout line\n'
    assert log.read_text() == 'log line\n'


def test_a_run_without_a_process_group_returns_from_the_exit():
    from dpa.engine.distributed import exit_distributed_run
    exit_distributed_run()  # no group: returns, the interpreter ends as usual
