"""The models an analysis runs: the base LLM, the merged proxy, or a stage's
trained model, each with the projector that stage uses."""
import copy
import os.path as osp

from mmengine.config import Config

from dpa.artifacts import read_current_manifest, read_manifest, stage_work_dir
from dpa.errors import ConfigError
from dpa.models.export import load_native
from dpa.registry import MODELS

MODEL_CHOICES = ('base', 'proxy', 'trained')


def _artifact(cfg: Config, stage: str, needed_for: str) -> str:
    work_dir = stage_work_dir(cfg, stage)
    # The analysis must describe the artifact the stage wrote, not a damaged or stale one.
    manifest = read_current_manifest(work_dir, stage, verify=True)
    if manifest is None:
        raise ConfigError(f'{needed_for} needs the artifact of stage {stage!r}, but '
                          f'{osp.join(work_dir, stage)} holds no finished stage: run '
                          f'`tools/train.py CONFIG --stage {stage}` with this --work-dir first')
    return manifest['artifact']


def analysis_llm(cfg: Config, stage: str, which: str) -> dict:
    """Config of the LLM ``which`` names for ``stage``."""
    if which == 'base':
        return copy.deepcopy(cfg.llm)
    if which == 'proxy':
        return dict(type='ProxyLLMWrapper', llm=copy.deepcopy(cfg.llm),
                    adapter=_artifact(cfg, 'proxy', '--model proxy'))
    if stage == 'align':  # the LLM the align stage trains against
        uses_proxy = cfg.align.get('use_proxy', True)
        return analysis_llm(cfg, stage, 'proxy' if uses_proxy else 'base')
    raise ValueError(f'--model trained of stage {stage!r} is the final model, not an LLM config')


def build_analysis_model(cfg: Config, stage: str, which: str):
    """The model and a sentence saying what it is.

    ``which`` picks the LLM: ``base`` (the config's LLM), ``proxy`` (base +
    stage-1 adapter, merged) or ``trained`` (what the stage trained: for
    ``align`` its LLM, proxy or base as the config says, with its trained
    projector; for ``finetune`` the final model). ``base`` and ``proxy`` use
    the align stage's projector, so the LLMs are compared on the same image
    features; before align has finished that is the projector align starts
    from (its random initialisation, seeded as in training).
    """
    if which not in MODEL_CHOICES:
        raise ValueError(f'--model must be one of {MODEL_CHOICES}, got {which!r}')
    if stage not in ('align', 'finetune'):
        raise ValueError(f"relevance needs images: --stage align or finetune, got {stage!r}")
    if stage == 'finetune' and which == 'trained':
        path = _artifact(cfg, 'finetune', '--stage finetune --model trained')
        return load_native(path).eval(), f'the final model ({path})'
    model = dict(copy.deepcopy(cfg.model), llm=analysis_llm(cfg, stage, which),
                 tokenizer=cfg.tokenizer, vision_tower=cfg.vision_tower,
                 loss=dict(type='VisualRelevanceLoss', mode='vanilla'),
                 trainable=['projector'])
    model.pop('gradient_checkpointing', None)
    if cfg.get('anyres'):
        model['anyres'] = copy.deepcopy(cfg.anyres)
    align = read_manifest(stage_work_dir(cfg, 'align'), 'align')
    if align is not None:
        model['projector_weights'] = osp.join(align['artifact'], 'projector.safetensors')
        projector = f"the align stage's projector ({align['artifact']})"
    elif stage == 'finetune':
        _artifact(cfg, 'align', '--stage finetune')
    else:
        projector = 'the projector align starts from (not trained yet)'
    llm = {'base': 'the base LLM', 'proxy': 'the proxy LLM (base + stage-1 adapter, merged)',
           'trained': "the align stage's LLM"}[which]
    return MODELS.build(model).eval(), f'{llm} with {projector}'
