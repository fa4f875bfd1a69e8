"""Shared fixtures: one finished run of the tiny default."""
import pytest

import dpa  # noqa: F401
from dpa.engine.pipeline import run_pipeline
from tiny import tiny_config


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp('data') / 'dpa_tiny'


@pytest.fixture(scope='session')
def finished(tmp_path_factory, data_root):
    """One uninterrupted run of all three stages of the tiny default."""
    work_dir = tmp_path_factory.mktemp('work')
    manifests = run_pipeline(tiny_config(work_dir, data_root))
    return work_dir, manifests
