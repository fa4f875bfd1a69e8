"""How an image becomes ``pixel_values``: LLaVA's pad-to-square followed by the
vision tower's own image processor. Training (the datasets) and the exported
processors share it, so a model is evaluated on exactly what it was trained on."""
from typing import Sequence

import torch
from PIL import Image


def expand_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """Pad to a square, centred, with the mean colour (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), tuple(int(c * 255) for c in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess_image(image: Image.Image, image_processor, pad_to_square: bool) -> torch.Tensor:
    """The ``pixel_values`` (channels, height, width) training feeds the model."""
    if pad_to_square:
        image = expand_to_square(image, image_processor.image_mean)
    return image_processor(images=image, return_tensors='pt').pixel_values[0]
