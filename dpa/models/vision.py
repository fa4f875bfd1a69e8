"""The vision tower: an HF vision model and the choice of which features feed
the projector."""
from typing import Optional

import torch
from torch import nn

from dpa.models.builders import HFVisionModel
from dpa.registry import MODELS


@MODELS.register_module()
class HFVisionTower(nn.Module):
    """Patch features of an HF vision model (CLIP, SigLIP, ...).

    Args:
        pretrained / config / torch_dtype / init_seed: see ``HFVisionModel``.
        feature_layer: hidden-state index whose features are used (LLaVA: -2).
        feature_select: ``'patch'`` drops the CLS token (LLaVA's "default"
            strategy for CLIP), ``'full'`` keeps every token (SigLIP has no CLS).
    """

    def __init__(self,
                 pretrained: Optional[str] = None,
                 config: Optional[dict] = None,
                 feature_layer: int = -2,
                 feature_select: str = 'patch',
                 torch_dtype: str = 'float32',
                 init_seed: int = 0):
        super().__init__()
        if feature_select not in ('patch', 'full'):
            raise ValueError("vision_tower.feature_select must be 'patch' or 'full', "
                             f'got {feature_select!r}')
        self.model = HFVisionModel(pretrained, config, torch_dtype, init_seed)
        self.feature_layer = feature_layer
        self.feature_select = feature_select
        self.has_cls = self.model.config.model_type.startswith('clip')

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        outputs = self.model(pixel_values.to(dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.feature_layer]
        if self.feature_select == 'patch' and self.has_cls:
            features = features[:, 1:]
        return features
