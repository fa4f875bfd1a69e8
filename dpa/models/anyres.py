"""Dynamic resolution ("AnyRes"), as LLaVA-NeXT does it.

An image is resized (aspect ratio kept, padded) to the best-fitting
resolution among ``grid_pinpoints``, cut into tiles of the vision tower's
input size, and a downscaled copy of the whole image (the "base" tile) goes
first. Every tile is encoded and projected on its own; the tiles' features are
then laid out as one feature map, the padding is cut away again (the original
aspect ratio) and a learned ``image_newline`` vector ends every row
(``mm_patch_merge_type='spatial_unpad'``). An image therefore becomes a number
of tokens that depends on its size (:meth:`AnyRes.num_tokens`).

The tiling, grid and un-padding arithmetic are transformers' own LLaVA-NeXT
functions, and the image processor is transformers' ``LlavaNextImageProcessor``,
so the exported ``LlavaNextForConditionalGeneration`` sees what training saw
(tests/test_anyres.py checks the merge against its ``pack_image_features``).
"""
import json
import math
from typing import List, Optional, Sequence

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                image_size_to_num_patches,
                                                                unpad_image)
from transformers.utils import is_torchvision_available

from dpa.errors import ConfigError

ANYRES_KEYS = ('grid_pinpoints', 'grid_shapes', 'max_tiles')
# The image processor settings LlavaNextImageProcessor shares with CLIP's and SigLIP's.
SHARED_PROCESSOR_KEYS = ('do_convert_rgb', 'do_resize', 'size', 'resample', 'do_center_crop',
                         'crop_size', 'do_rescale', 'rescale_factor', 'do_normalize',
                         'image_mean', 'image_std')


def llava_next_image_processor_class():
    """transformers' LLaVA-NeXT image processor class for the installed backends
    (both save as ``LlavaNextImageProcessor``)."""
    import transformers
    name = ('LlavaNextImageProcessor' if is_torchvision_available() else
            'LlavaNextImageProcessorPil')
    return getattr(transformers, name)


class AnyRes:
    """LLaVA-NeXT's AnyRes for one vision tower: which tiles an image becomes,
    how many tokens, and how the tiles' features are merged.

    Args:
        tile_size: the vision tower's input size in pixels.
        patch_size: the vision tower's patch size in pixels.
        grid_pinpoints: the resolutions an image may be resized to, as
            ``[height, width]`` pairs in pixels, each a multiple of
            ``tile_size`` (LLaVA-NeXT's ``image_grid_pinpoints``).
        grid_shapes: the same as ``[rows, columns]`` of tiles (resolutions
            ``rows * tile_size`` by ``columns * tile_size``), which holds for
            any vision tower size, e.g. under the tiny stand-in switch. Give
            one of the two.
        max_tiles: keep only the pinpoints of at most this many tiles (the
            base tile not counted); None: all of them.
    """

    def __init__(self, tile_size: int, patch_size: int,
                 grid_pinpoints: Optional[Sequence[Sequence[int]]] = None,
                 grid_shapes: Optional[Sequence[Sequence[int]]] = None,
                 max_tiles: Optional[int] = None):
        if (grid_pinpoints is None) == (grid_shapes is None):
            raise ValueError('anyres needs grid_pinpoints ([height, width] in pixels) or '
                             'grid_shapes ([rows, columns] of tiles), one of the two')
        if grid_shapes is not None:
            grid_pinpoints = [[rows * tile_size, columns * tile_size]
                              for rows, columns in grid_shapes]
        pinpoints = [[int(h), int(w)] for h, w in grid_pinpoints]
        if not pinpoints:
            raise ValueError('anyres.grid_pinpoints is empty; give [height, width] resolutions')
        bad = [p for p in pinpoints if p[0] % tile_size or p[1] % tile_size or min(p) <= 0]
        if bad:
            raise ValueError(f'anyres.grid_pinpoints {bad} are not positive multiples of the '
                             f'vision tower\'s {tile_size}-pixel input size')
        if max_tiles is not None:
            pinpoints = [p for p in pinpoints if (p[0] // tile_size) * (p[1] // tile_size)
                         <= max_tiles]
            if not pinpoints:
                raise ValueError(f'anyres.max_tiles={max_tiles} leaves none of the grid '
                                 'pinpoints; raise it or add smaller pinpoints')
        self.grid_pinpoints = pinpoints
        self.tile_size = tile_size
        self.patch_size = patch_size
        self.max_tiles = max_tiles
        self.side = tile_size // patch_size  # patches along a tile's side

    @classmethod
    def for_vision_tower(cls, vision_tower, **anyres) -> 'AnyRes':
        """The AnyRes of an ``HFVisionTower`` (``anyres``: the other
        arguments), whose tiles must give square feature maps (no CLS token kept).

        Raises:
            ValueError: the vision tower keeps a CLS token (``feature_select='full'``
                on CLIP), which no feature map has a place for.
        """
        if vision_tower.has_cls and vision_tower.feature_select == 'full':
            raise ValueError("anyres needs the vision tower's patch features laid out as a grid: "
                             "set vision_tower.feature_select='patch' (drops CLIP's CLS token)")
        config = vision_tower.model.config
        return cls(config.image_size, config.patch_size, **anyres)

    @property
    def config(self) -> dict:
        """The settings, as the model and dataset configs take them."""
        return dict(grid_pinpoints=self.grid_pinpoints, max_tiles=self.max_tiles)

    def num_tiles(self, image_size: Sequence[int]) -> int:
        """Tiles of an image of ``(height, width)`` pixels, the base tile included."""
        return image_size_to_num_patches(list(image_size), self.grid_pinpoints, self.tile_size)

    def grid_shape(self, image_size: Sequence[int]):
        """(rows, columns) of tiles an image of ``(height, width)`` is cut into."""
        return get_anyres_image_grid_shape(list(image_size), self.grid_pinpoints, self.tile_size)

    def num_tokens(self, image_size: Sequence[int]) -> int:
        """Image tokens of an image of ``(height, width)`` pixels: the base
        tile's patches, then the un-padded feature map with one newline per row."""
        rows, columns = self.grid_shape(image_size)
        # unpad_image only slices: an empty feature map gives the kept shape.
        kept = unpad_image(torch.empty(0, rows * self.side, columns * self.side),
                           list(image_size))
        height, width = kept.shape[1:]
        return self.side * self.side + height * (width + 1)

    def merge(self, features: torch.Tensor, image_sizes: torch.Tensor,
              image_newline: torch.Tensor) -> List[torch.Tensor]:
        """The image tokens of each image, from its tiles' projected features.

        Args:
            features: (tiles of all images, patches per tile, dim), the images'
                tiles one after the other, each image's base tile first.
            image_sizes: (images, 2) original ``(height, width)`` of each image.
            image_newline: (dim,) the vector that ends each row.

        Returns:
            One (num_tokens, dim) tensor per image, as transformers'
            ``LlavaNextModel.pack_image_features`` makes them.
        """
        counts = [self.num_tiles(size) for size in image_sizes.tolist()]
        if sum(counts) != features.shape[0] or features.shape[1] != self.side * self.side:
            raise ValueError(f'{features.shape[0]} tiles of {features.shape[1]} features for '
                             f'images of sizes {image_sizes.tolist()}, which need {counts} tiles '
                             f'of {self.side * self.side}')
        merged = []
        for tiles, size in zip(torch.split(features, counts), image_sizes.tolist()):
            rows, columns = self.grid_shape(size)
            grid = tiles[1:].view(rows, columns, self.side, self.side, -1)
            # (dim, rows x side, columns x side): the tiles as one feature map.
            grid = grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
            grid = unpad_image(grid, size)
            newline = image_newline.to(grid.dtype)[:, None, None].expand(*grid.shape[:-1], 1)
            grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
            merged.append(torch.cat((tiles[0], grid), dim=0))
        return merged

    def image_processor(self, image_processor):
        """A ``LlavaNextImageProcessor`` with the settings of the vision tower's
        own processor (``image_processor``) and these pinpoints: the tiles and
        the base tile are each preprocessed as that processor would.

        Raises:
            ValueError: the processor's output size is not the vision tower's.
        """
        settings = {k: v for k, v in image_processor.to_dict().items()
                    if k in SHARED_PROCESSOR_KEYS}
        settings.setdefault('do_center_crop', False)
        processor = llava_next_image_processor_class()(
            **settings, image_grid_pinpoints=self.grid_pinpoints, do_pad=True)
        crop = processor.crop_size if processor.do_center_crop else processor.size
        side = crop.get('height') or crop.get('shortest_edge')
        if side != self.tile_size:
            raise ValueError(f'the image processor makes {side}-pixel images but the vision '
                             f'tower takes {self.tile_size}: anyres tiles must be its input size')
        return processor

    def preprocess(self, image, image_processor) -> dict:
        """``pixel_values`` (tiles, channels, height, width) and ``image_size``
        (height, width) of one PIL image, by a processor from
        :meth:`image_processor`."""
        out = image_processor(images=image, return_tensors='pt')
        size = out['image_sizes'][0]
        return dict(pixel_values=out['pixel_values'][0][:self.num_tiles(size.tolist())],
                    image_size=size.long())


def anyres_settings(anyres: dict, vision_tower: dict) -> dict:
    """:class:`AnyRes` arguments from a config's ``anyres`` and ``vision_tower``
    (an ``HFVisionTower`` config; its HF config is read, no weights)."""
    from dpa.models.builders import _vision_config, hf_config
    unknown = set(anyres) - set(ANYRES_KEYS)
    if unknown:
        raise ValueError(f'anyres has unknown keys {sorted(unknown)}; it takes {ANYRES_KEYS}')
    config = _vision_config(hf_config(vision_tower.get('pretrained'), vision_tower.get('config')))
    return dict(json.loads(json.dumps(dict(anyres))), tile_size=config.image_size,
                patch_size=config.patch_size)


def new_image_newline(llm_dim: int) -> nn.Parameter:
    """LLaVA-NeXT's learned end-of-row vector, initialised as it does
    (normal, standard deviation 1/sqrt(dim))."""
    return nn.Parameter(torch.randn(llm_dim) / math.sqrt(llm_dim))


def add_image_newline(projector: nn.Module, llm_dim: int) -> None:
    """Give the connector LLaVA-NeXT's ``image_newline``: it then trains with
    the projector (stage 2), is saved in its artifact and loaded with it into
    stage 3 and the final model."""
    projector.register_parameter('image_newline', new_image_newline(llm_dim))


def check_anyres_config(anyres: dict, vision_tower: dict, stage: str, pads_images: bool) -> None:
    """A config's ``anyres`` for one image stage, checked before any model loads.

    Args:
        anyres / vision_tower: the config's sections.
        stage: the stage, named in the message.
        pads_images: whether the stage pads images to a square.

    Raises:
        ConfigError: naming the key to change.
    """
    if pads_images:
        raise ConfigError(f'{stage}: anyres resizes and pads images to its grid itself; set '
                          f'pad_to_square=False and leave {stage}.image_mode out')
    try:
        AnyRes(**anyres_settings(anyres, vision_tower))
    except ValueError as err:
        raise ConfigError(str(err)) from None
