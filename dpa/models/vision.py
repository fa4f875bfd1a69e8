"""The vision tower: an HF vision model and the choice of which features feed
the projector."""
import contextlib
from typing import Optional, Union

import torch
from torch import nn

from dpa.errors import ConfigError
from dpa.models.builders import HFVisionModel, has_cls_token
from dpa.models.feature_cache import FeatureCache, module_digest
from dpa.registry import MODELS


@MODELS.register_module()
class HFVisionTower(nn.Module):
    """Patch features of an HF vision model (CLIP, SigLIP, DINOv2, ...).

    Args:
        pretrained / config / torch_dtype / init_seed: see ``HFVisionModel``.
        feature_layer: hidden-state index whose features are used (LLaVA: -2).
            Hidden states are the layers' outputs before any final norm.
        feature_select: ``'patch'`` drops the CLS token (LLaVA's "default"
            strategy for CLIP and DINOv2), ``'full'`` keeps every token
            (SigLIP has no CLS).
        image_size: the side of the pictures it is given, in pixels (the
            image processor's crop size); None: the HF config's
            ``image_size``. A model that interpolates its position
            embeddings (DINOv2) takes any multiple of its patch size, so a
            CPU run can ask for few tokens: (image_size / patch)^2.
        feature_scale: a constant the selected features are multiplied by
            before the projector. The projector's first layer then learns as
            fast as on features of that larger norm: DINOv2-S's intermediate
            features are small (per-token norm about 4 at layer -4), and at
            LLaVA's projector rates the projector learnt position and shape
            but hardly colour from them (docs/vision.md). The export folds it
            into the projector's first weight (exact), so transformers'
            LLaVA needs no knob for it.
        feature_cache: keep each picture's features on disk while the tower
            is frozen and reuse them (:mod:`dpa.models.feature_cache`): True
            (under ``$DPA_FEATURE_CACHE``, else ``~/.cache/dpa/features``), a
            folder, or False.
    """

    def __init__(self,
                 pretrained: Optional[str] = None,
                 config: Optional[dict] = None,
                 feature_layer: int = -2,
                 feature_select: str = 'patch',
                 torch_dtype: str = 'float32',
                 init_seed: int = 0,
                 image_size: Optional[int] = None,
                 feature_cache: Union[bool, str] = False,
                 feature_scale: float = 1.0):
        super().__init__()
        if not feature_scale > 0:
            raise ValueError(f'vision_tower.feature_scale must be > 0, got {feature_scale!r}')
        self.feature_scale = float(feature_scale)
        if feature_select not in ('patch', 'full'):
            raise ValueError("vision_tower.feature_select must be 'patch' or 'full', "
                             f'got {feature_select!r}')
        self.model = HFVisionModel(pretrained, config, torch_dtype, init_seed)
        self.feature_layer = feature_layer
        self.feature_select = feature_select
        self.has_cls = has_cls_token(self.model.config)
        self.image_size = image_size or self.model.config.image_size
        self.feature_cache_root = (None if feature_cache is True else feature_cache) or None
        self.use_feature_cache = bool(feature_cache)
        self._cache = None

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.parameters())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not (self.use_feature_cache and self.frozen):
            features = self.compute_features(pixel_values)
        else:
            if self._cache is None:
                # Read the weights once, when they are final (after any loading).
                dtype = next(self.model.parameters()).dtype
                self._cache = FeatureCache(self.feature_cache_root, module_digest(
                    self.model, self.feature_layer, self.feature_select, str(dtype)))
            features = self._cache.features(pixel_values, self.compute_features)
        # After the cache: the cached features do not depend on the scale.
        return features * self.feature_scale if self.feature_scale != 1.0 else features

    def compute_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's features of ``pixel_values``, without the cache or
        ``feature_scale``.

        A frozen tower computes in its own dtype (``torch_dtype``), outside
        any autocast of the stage (``mixed_precision``): its features are then
        the same under every precision setting, so the feature cache, keyed by
        that dtype, serves them to every stage and run. (A float32 DINOv2
        under the LLM's bf16 autocast gave other features, and a cache filled
        so gave a float32 run bf16 features.) A bf16 tower (the GPU configs')
        computes in bf16 either way."""
        dtype = next(self.model.parameters()).dtype
        with (torch.autocast(pixel_values.device.type, enabled=False) if self.frozen
              else contextlib.nullcontext()):
            outputs = self.model(pixel_values.to(dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.feature_layer]
        if self.feature_select == 'patch' and self.has_cls:
            features = features[:, 1:]
        return features


def _processor_side(processor: dict):
    """The side of the square pictures an image processor config makes, if it says."""
    crop = processor.get('crop_size') if processor.get('do_center_crop', True) else None
    size = processor.get('size')
    for value in (crop, size):
        if isinstance(value, dict) and value.get('height') is not None \
                and value.get('height') == value.get('width'):
            return value['height']
    if isinstance(size, dict) and 'crop_size' not in processor:
        return size.get('shortest_edge')
    return None


def check_image_size(vision_tower: dict, image_processor: dict) -> None:
    """A tower given ``image_size`` is given pictures of that side by its
    image processor (config check, nothing loaded): otherwise each picture
    would bring another number of features than ``<image>`` tokens."""
    size = (vision_tower or {}).get('image_size')
    processor = (image_processor or {}).get('config')
    if size is None or processor is None:
        return
    side = _processor_side(processor)
    if side is not None and side != size:
        raise ConfigError(f'vision_tower.image_size={size} but the image processor makes '
                          f'{side}-pixel pictures (image_processor.config crop_size/size): set '
                          'both to the same size')
