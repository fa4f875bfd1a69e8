"""Connectors from vision features to the LLM's embedding space."""
from safetensors import safe_open
from torch import nn

from dpa.errors import ConfigError
from dpa.models.builders import hf_config, llm_config
from dpa.registry import MODELS


@MODELS.register_module(name='mlp2x_gelu')
class MLP2xGELUProjector(nn.Module):
    """LLaVA-1.5's connector. Parameter names match transformers'
    ``LlavaMultiModalProjector`` so the weights export as they are."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


@MODELS.register_module(name='linear')
class LinearProjector(nn.Module):
    """LLaVA-1.0's connector: one linear layer."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)

    def forward(self, features):
        return self.linear_1(features)


def check_projector_file(path: str, llm: dict, vision_tower: dict, anyres: bool) -> None:
    """A trained projector (``projector.safetensors``) fits this config's LLM,
    vision tower and ``anyres``; read from the file's header and the HF
    configs, before any model loads.

    Raises:
        ConfigError: naming the part that does not fit.
    """
    with safe_open(path, framework='pt') as weights:
        llm_dim, vision_dim = weights.get_slice('linear_1.weight').get_shape()
        has_newline = 'image_newline' in weights.keys()
    if has_newline != bool(anyres):
        made, now = ('with', 'without') if has_newline else ('without', 'with')
        raise ConfigError(f'the projector in {path} was trained {made} anyres (image_newline) '
                          f'but this config is {now}: use the same `anyres` in every stage')
    vision_cfg = hf_config(vision_tower.get('pretrained'), vision_tower.get('config'))
    expected = getattr(vision_cfg, 'vision_config', None) or vision_cfg
    if expected.hidden_size != vision_dim:
        raise ConfigError(f'vision_tower: its features have {expected.hidden_size} channels but '
                          f'the projector in {path} takes {vision_dim}')
    llm_cfg = llm_config(llm)
    if llm_cfg.get_text_config().hidden_size != llm_dim:
        raise ConfigError(f'llm: its hidden size is {llm_cfg.get_text_config().hidden_size} but '
                          f'the projector in {path} outputs {llm_dim}')
