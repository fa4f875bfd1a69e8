"""Shared fixtures: one finished run of the tiny default; one torch thread."""
import pytest
import torch

import dpa  # noqa: F401
from dpa.engine.pipeline import run_pipeline
from dpa.models import feature_cache, onnx_vision
from tiny import tiny_config


@pytest.fixture(scope='session', autouse=True)
def own_caches(tmp_path_factory):
    """Vision features and ONNX conversions go to this session's folders, not
    to ~/.cache: no test reads what an earlier run left there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(feature_cache.CACHE_ENV, str(tmp_path_factory.mktemp('features')))
        patch.setenv(onnx_vision.CACHE_ENV, str(tmp_path_factory.mktemp('onnx')))
        yield


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp('data') / 'dpa_tiny'


@pytest.fixture(scope='session')
def finished(tmp_path_factory, data_root):
    """One uninterrupted run of all three stages of the tiny default."""
    work_dir = tmp_path_factory.mktemp('work')
    manifests = run_pipeline(tiny_config(work_dir, data_root))
    return work_dir, manifests


@pytest.fixture(scope='module')
def one_thread():
    """Run a module's tests on one torch thread (``pytestmark =
    pytest.mark.usefixtures('one_thread')``): tiny matrices gain nothing from
    intra-op threads, and on a shared machine they lose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
