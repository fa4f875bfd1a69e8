from dpa.engine.checkpoint import register_checkpoint_io
from dpa.engine.hooks import DPAHook
from dpa.engine.pipeline import run_pipeline, TrainingStage
from dpa.engine.stage_config import STAGES
from dpa.engine.relevance_logging import RelevanceHistogramHook
from dpa.engine.schedule import EpochsAsItersTrainLoop, WarmupCosineLR
from dpa.engine.standin import make_tiny

register_checkpoint_io()

__all__ = ['DPAHook', 'EpochsAsItersTrainLoop', 'RelevanceHistogramHook', 'STAGES', 'TrainingStage',
           'WarmupCosineLR', 'make_tiny', 'run_pipeline']
