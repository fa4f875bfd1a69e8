"""mmengine's resume on torch >= 2.6: ``torch.load`` now defaults to
``weights_only=True`` and rejects the HistoryBuffer and numpy objects that
mmengine itself stores in checkpoints. The runner only loads checkpoints this
project wrote into its own work directory, so they are loaded in full."""
import torch
from mmengine.runner import CheckpointLoader


def _load_local(filename, map_location=None):
    return torch.load(filename, map_location=map_location, weights_only=False)


def register_trusted_checkpoint_loader():
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local, force=True)
