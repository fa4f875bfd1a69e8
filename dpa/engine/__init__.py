from dpa.engine.checkpoint import register_trusted_checkpoint_loader
from dpa.engine.hooks import DPAHook
from dpa.engine.pipeline import STAGES, run_pipeline
from dpa.engine.schedule import EpochsAsItersTrainLoop, WarmupCosineLR

register_trusted_checkpoint_loader()

__all__ = ['DPAHook', 'EpochsAsItersTrainLoop', 'STAGES', 'WarmupCosineLR', 'run_pipeline']
