"""Child registries of mmengine's roots, so ``type=`` names in configs resolve to
this package first and fall back to mmengine's own components (Runner hooks,
optimizers, loops, schedulers). Every root the Runner builds from has a child
here, as in mmpretrain, so the 'dpa' default scope resolves everywhere.

``PIPELINE_STAGES`` is the project's own: the stages a pipeline config can list
in ``stages`` (the three training stages, ``eval``), each registered beside its
code, so the engine runs a stage it does not import (see
:mod:`dpa.engine.stages`)."""
from mmengine import registry as mm
from mmengine.registry import Registry


def _child(root: Registry, location: str = None) -> Registry:
    return Registry(root.name, parent=root, locations=[location] if location else [])


MODELS = _child(mm.MODELS, 'dpa.models')
DATASETS = _child(mm.DATASETS, 'dpa.datasets')
DATA_SAMPLERS = _child(mm.DATA_SAMPLERS, 'dpa.datasets')
FUNCTIONS = _child(mm.FUNCTIONS, 'dpa.datasets')
HOOKS = _child(mm.HOOKS, 'dpa.engine')
LOOPS = _child(mm.LOOPS, 'dpa.engine')
PARAM_SCHEDULERS = _child(mm.PARAM_SCHEDULERS, 'dpa.engine')
RUNNERS = _child(mm.RUNNERS)
RUNNER_CONSTRUCTORS = _child(mm.RUNNER_CONSTRUCTORS)
TRANSFORMS = _child(mm.TRANSFORMS)
MODEL_WRAPPERS = _child(mm.MODEL_WRAPPERS)
WEIGHT_INITIALIZERS = _child(mm.WEIGHT_INITIALIZERS)
OPTIMIZERS = _child(mm.OPTIMIZERS)
OPTIM_WRAPPERS = _child(mm.OPTIM_WRAPPERS)
OPTIM_WRAPPER_CONSTRUCTORS = _child(mm.OPTIM_WRAPPER_CONSTRUCTORS)
METRICS = _child(mm.METRICS)
EVALUATOR = _child(mm.EVALUATOR)
TASK_UTILS = _child(mm.TASK_UTILS)
VISUALIZERS = _child(mm.VISUALIZERS)
VISBACKENDS = _child(mm.VISBACKENDS)
LOG_PROCESSORS = _child(mm.LOG_PROCESSORS)
STRATEGIES = _child(mm.STRATEGIES)

PIPELINE_STAGES = Registry('pipeline stage',
                           locations=['dpa.engine.pipeline', 'dpa.evaluation.stage'])
