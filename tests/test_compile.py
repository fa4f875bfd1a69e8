"""``compile=True`` (torch.compile of the LLM's decoder layers) keeps the loss,
the gradients and the parameter names of the eager model.

The CPU test compiles with ``backend='aot_eager'``: dynamo captures each layer
and AOTAutograd builds its forward and backward graphs, the graphs inductor
would turn into kernels. Inductor itself is not run here: generating and
building its C++ kernels for the two tiny layers took 77 s on this 2-core
machine (loss equal, gradients within 2e-8, measured once), over the suite's
budget; a GPU run checks it (docs/benchmarks.md)."""
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config

import dpa  # noqa: F401
from dpa.engine.compile import apply_gpu_switches, check_compile, compile_options
from dpa.errors import ConfigError
from test_families import build_model
from tiny import REPO, tiny_config


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, torch.ones_like(ids), ids.clone())['loss']
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_compiled_decoder_layers_keep_loss_gradients_and_names():
    torch.set_num_threads(1)
    model = build_model('qwen2_5', dtype='float32').train()
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in model.named_parameters()]
    eager_loss, eager_grads = loss_and_grads(model, ids)
    runner = SimpleNamespace(model=SimpleNamespace(module=model))  # a wrapped model
    apply_gpu_switches(Config(dict(compile=dict(backend='aot_eager'))), runner)
    layers = model.llm.model.layers
    assert all(getattr(layer.forward, '_torchdynamo_orig_callable', None) for layer in layers)
    loss, grads = loss_and_grads(model, ids)
    assert loss.item() == eager_loss.item()
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert [n for n, _ in model.named_parameters()] == names
    assert not any('_orig_mod' in key for key in model.state_dict())


def test_compile_options():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == dict(backend='inductor')
    assert compile_options(dict(mode='max-autotune')) == dict(backend='inductor',
                                                              mode='max-autotune')
    with pytest.raises(ConfigError, match='compile=.yes.: give True, False'):
        compile_options('yes')


def test_tf32_is_switched_on_only_for_a_cuda_run(monkeypatch):
    before = torch.get_float32_matmul_precision()
    runner = SimpleNamespace(model=None)
    try:
        apply_gpu_switches(Config(dict(tf32=True)), runner)
        assert torch.get_float32_matmul_precision() == before  # no GPU here
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        apply_gpu_switches(Config(dict(tf32=False)), runner)
        assert torch.get_float32_matmul_precision() == before
        apply_gpu_switches(Config(dict(tf32=True)), runner)
        assert torch.get_float32_matmul_precision() == 'high'
    finally:
        torch.set_float32_matmul_precision(before)
    assert Config.fromfile(f'{REPO}/configs/dpa_qwen2_5_7b.py').tf32 is True


def test_a_compile_mistake_fails_before_any_model_loads(tmp_path, monkeypatch):
    import transformers

    from dpa.engine.pipeline import run_pipeline

    def no_model(*args, **kwargs):
        raise AssertionError('a model was built before the config was checked')

    monkeypatch.setattr(transformers.PreTrainedModel, '__init__', no_model)
    with pytest.raises(ConfigError, match='compile=.yes.: give True, False'):
        run_pipeline(tiny_config(tmp_path, tmp_path / 'data', compile='yes'))
    deepspeed = Config(dict(compile=True, strategy=dict(type='DeepSpeedStrategy')))
    with pytest.raises(ConfigError, match='DeepSpeed'):
        check_compile(deepspeed)
    check_compile(Config(dict(compile=False, strategy=dict(type='DeepSpeedStrategy'))))
    check_compile(Config(dict(compile=True, strategy=dict(type='FSDP2Strategy'))))
