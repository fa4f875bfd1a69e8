"""The tiny stand-in switch: ``--cfg-options tiny_standin=True``.

It replaces every checkpoint of a config by a random tiny model of the same
architecture and the data by the synthetic set, so any config, even one
pointing at 32B checkpoints that are not on this machine, loads, builds and
runs its stages in seconds on a CPU, through the same code path as the real
run. The model base files say what "the same architecture" is:

- ``llm_standin = dict(config=dict(model_type=..., <family settings>),
  tokenizer=dict(type='TinyTokenizer', family=...))``: the family's HF config
  settings that change the computation (Gemma-2's soft-capping, tied
  embeddings, rope scaling, ...) and its tokenizer stand-in, with the
  family's real chat template and special tokens;
- ``vision_standin = dict(config=dict(model_type=...), image_processor=...)``:
  the vision tower's type and its image processor at the stand-in's 32 pixels.

Sizes come from ``TINY_LLM`` / ``TINY_VISION`` unless the family (or an
override such as ``llm_standin.config.hidden_size=896``) sets them, and the
synthetic set's from ``TINY_DATA`` unless ``standin_data`` does; it is made
under ``standin_data_root``. What the config says about the recipe (losses,
LoRA, stages, feature layer, gradient checkpointing, mixture ratios) is kept;
every stage gets ``TINY_BATCH`` samples per device and two micro-batches per
optimizer step (two iterations per stage in one process). Without a GPU,
DeepSpeed/FSDP and mixed precision are dropped: they need an accelerator.

The builders then save each random stand-in (LLM, tokenizer, vision tower)
and load it back with ``from_pretrained`` like the checkpoint it replaces
(:mod:`dpa.models.standin_checkpoint`), so loading failures show here too.
"""
import copy

import torch
from mmengine.config import Config

from dpa.datasets.mixture import data_sources
from dpa.engine.distributed import world_size
from dpa.errors import ConfigError
from dpa.models.attention import resolve_attn_implementation

TINY_LLM = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=8)
# Four rows per set, two per batch, one optimizer step of two micro-batches.
TINY_DATA = dict(num_captions=4, num_instructions=4, image_size=32, seed=0)
TINY_BATCH = 2
DEFAULT_DATA_ROOT = 'data/dpa_standin'
DATA_KEYS = ('caption_data', 'instruct_data')


def _standin(cfg, key: str, part: str) -> dict:
    spec = cfg.get(key)
    if spec is None:
        raise ConfigError(f'tiny_standin: `{part}` loads a checkpoint but the config has no '
                          f'`{key}` saying which random tiny model stands in for it (see '
                          'configs/_base_/models/)')
    return spec


def _tiny_llm(cfg) -> dict:
    llm = dict(cfg.llm)
    if llm.get('pretrained') is None:
        return llm  # already a random model built from a config
    spec = _standin(cfg, 'llm_standin', 'llm')
    llm.pop('pretrained')
    if 'attn_implementation' in llm:
        # The kernel this machine runs: a preference list names it once resolved.
        llm['attn_implementation'] = resolve_attn_implementation(llm['attn_implementation'],
                                                                 log=False)
    return dict(llm, config={**TINY_LLM, **spec['config']}, torch_dtype='float32')


def _tiny_tokenizer(cfg) -> dict:
    if cfg.tokenizer.get('pretrained') is None:
        return dict(cfg.tokenizer)
    return dict(_standin(cfg, 'llm_standin', 'tokenizer')['tokenizer'])


def _tiny_vision(cfg):
    vision, processor = dict(cfg.vision_tower), dict(cfg.image_processor)
    replaced = vision.get('pretrained') is not None
    if replaced:
        spec = _standin(cfg, 'vision_standin', 'vision_tower')
        vision.pop('pretrained')
        vision.pop('image_size', None)  # the stand-in's pictures are TINY_VISION's
        vision.update(config={**TINY_VISION, **spec['config']}, torch_dtype='float32')
    if replaced or processor.get('pretrained') is not None:
        # The stand-in tower's pictures are its own size, whatever the real one's were.
        spec = _standin(cfg, 'vision_standin', 'image_processor')
        processor = dict(type='HFImageProcessor', config=spec['image_processor'])
    return vision, processor


def make_tiny(cfg: Config, cpu_only: bool = None) -> Config:
    """A copy of ``cfg`` with tiny random stand-ins and synthetic data.

    Args:
        cfg: a pipeline config.
        cpu_only: drop what needs an accelerator (DeepSpeed/FSDP strategies,
            mixed precision); default: when no GPU is visible.

    Raises:
        ConfigError: a part loads a checkpoint and the config does not say
            which stand-in replaces it.
    """
    cfg = copy.deepcopy(cfg)
    if cpu_only is None:
        cpu_only = not torch.cuda.is_available()
    if cfg.get('llm') is not None:
        cfg.llm, cfg.tokenizer = _tiny_llm(cfg), _tiny_tokenizer(cfg)
    if cfg.get('vision_tower') is not None:
        cfg.vision_tower, cfg.image_processor = _tiny_vision(cfg)

    cfg.synthetic_data = dict(root=cfg.get('standin_data_root', DEFAULT_DATA_ROOT),
                              **{**TINY_DATA, **cfg.get('standin_data', {})})
    for key in DATA_KEYS:
        if cfg.get(key) is not None:
            # The pipeline points every source at the synthetic files; a
            # mixture keeps its sources and ratios.
            for source in data_sources(cfg[key]).values():
                source.update(data_files=[], image_folder='')
    processes = world_size(cfg.get('launcher', 'none'))
    for stage in ('proxy', 'align', 'finetune'):
        if cfg.get(stage) is not None:
            cfg[stage].update(batch_size=TINY_BATCH, num_workers=0,
                              global_batch_size=TINY_BATCH * processes * 2)
    if cpu_only:
        cfg.strategy = None
        cfg.mixed_precision = None
    return cfg
