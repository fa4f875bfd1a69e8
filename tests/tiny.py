"""The tiny default config, redirected to test directories."""
import os.path as osp

from mmengine.config import Config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'configs', 'dpa_tiny.py')


def tiny_config(work_dir, data_root, path=TINY, **overrides):
    """A config file with its work dir and synthetic data root redirected."""
    cfg = Config.fromfile(path)
    cfg.merge_from_dict({'work_dir': str(work_dir), 'synthetic_data.root': str(data_root),
                         **overrides})
    return cfg
