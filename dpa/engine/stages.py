"""What the pipeline asks of a stage, and how it finds one by name.

A stage is registered in :data:`dpa.registry.PIPELINE_STAGES` under the name a
config lists in ``stages``: the three training stages by
:mod:`dpa.engine.pipeline` (``TrainingStage``), ``eval`` by
:mod:`dpa.evaluation.stage`. The engine looks stages up by name, so it never
imports the evaluation package; the registry imports a stage's module the
first time it is asked for it.

A new stage subclasses :class:`Stage`, registers itself, and appears in a
config's ``stages`` after the training stages (see docs/architecture.md).
"""
from typing import List

from dpa.engine.stage_config import STAGES
from dpa.errors import ConfigError
from dpa.registry import PIPELINE_STAGES


class Stage:
    """One step of a pipeline run.

    Args:
        name: the name it is registered and listed under.
    """
    trains = False

    def __init__(self, name: str):
        self.name = name

    def check(self, cfg, training_stages: List[str]) -> None:
        """Raise :class:`ConfigError` for a mistake that needs no model; called
        by :func:`dpa.engine.preflight.check_config` after the training stages'
        checks."""

    def use_synthetic_data(self, cfg, paths: dict) -> None:
        """Point the stage at the synthetic data (``paths`` from
        :func:`dpa.datasets.synthetic.make_synthetic_data`) when it names none."""

    def describe(self, cfg, step) -> List[str]:
        """The dry run's lines for this stage (``step``: its
        :class:`dpa.engine.preflight.StagePlan`)."""
        raise NotImplementedError

    def run(self, cfg, step, options) -> dict:
        """Run the stage (or skip it) and return its manifest, with ``skipped``."""
        raise NotImplementedError

    def summary_lines(self, manifest: dict) -> List[str]:
        """The stage's lines of the run summary."""
        raise NotImplementedError


def closing_stage_names() -> List[str]:
    """The registered stages that run after training (e.g. ``eval``), by name."""
    PIPELINE_STAGES.import_from_location()
    return sorted(name for name in PIPELINE_STAGES.module_dict if name not in STAGES)


def stage_names() -> List[str]:
    """Every stage a config may list, in the order they run: the training
    stages, then the closing stages."""
    return list(STAGES) + closing_stage_names()


def build_stage(name: str) -> Stage:
    """The registered stage ``name``."""
    cls = PIPELINE_STAGES.get(name)
    if cls is None:
        raise ConfigError(f'stages: unknown stage {name!r}; choose among {stage_names()}')
    return cls(name)
