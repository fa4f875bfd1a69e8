"""The peer the benchmark compares against: transformers'
``LlavaForConditionalGeneration`` (``LlavaNextForConditionalGeneration`` for
an AnyRes model) trained with its own loss, what TRL-based LLaVA training
runs (full logits, then ``ForCausalLMLoss``)."""
from itertools import chain

import torch
from torch import nn
from torch.profiler import record_function
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from dpa.models.export import llava_config
from dpa.models.export_llava_next import llava_next_config


def transformers_llava(model) -> nn.Module:
    """transformers' LLaVA (or LLaVA-NeXT) made of ``model``'s own modules (no
    copy): the same weights, gradients and optimizer, only the forward and the
    loss differ.

    Args:
        model: a :class:`dpa.models.LlavaDPAModel` with a transformers-native
            LLM, an HF vision tower and the mlp2x_gelu projector.

    An ``<image>`` id outside the LLM's vocabulary (a tokenizer that added it,
    as SmolLM2's does) is given to the peer as an id inside it that the batch
    does not use (:func:`peer_loss`): transformers' LLaVA looks the image
    tokens up in the embedding table before it replaces them, and the export
    resizes the table, which the peer cannot do to modules it shares.
    """
    text_config = model.llm.config.to_dict()
    with torch.device('meta'):
        if model.anyres is None:
            llava = LlavaForConditionalGeneration(llava_config(model, text_config))
        else:
            llava = LlavaNextForConditionalGeneration(llava_next_config(model, text_config))
    llava.model.language_model = model.llm.get_decoder()
    llava.model.vision_tower = model.vision_tower.model
    llava.model.multi_modal_projector = model.projector
    if model.anyres is not None:
        llava.model.image_newline = model.projector.image_newline
    llava.lm_head = model.llm.get_output_embeddings()
    llava.dpa_image_token_id = model.image_token_id
    left = [name for name, tensor in chain(llava.named_parameters(), llava.named_buffers())
            if tensor.is_meta]
    if left:
        raise RuntimeError(f'transformers LLaVA has parts this model does not fill: {left}')
    return llava.train(model.training)


def peer_loss(llava: nn.Module, input_ids, attention_mask, labels, pixel_values=None,
              image_sizes=None) -> dict:
    """The peer's training loss on one of the benchmark's batches (AnyRes:
    every image with the same number of tiles, as the benchmark makes them)."""
    extra = {}
    vocab = llava.get_input_embeddings().num_embeddings
    image_id = llava.dpa_image_token_id
    if image_id >= vocab:
        used = torch.zeros(vocab, dtype=torch.bool, device=input_ids.device)
        used[input_ids[input_ids < vocab]] = True
        free = int((~used).nonzero()[0, 0])  # an id the batch does not hold
        input_ids = input_ids.masked_fill(input_ids == image_id, free)
        image_id = free
    llava.config.image_token_id = llava.model.config.image_token_id = image_id
    if image_sizes is not None:
        # LLaVA-NeXT takes (images, tiles, C, H, W); ours are concatenated.
        pixel_values = pixel_values.view(len(image_sizes), -1, *pixel_values.shape[1:])
        extra['image_sizes'] = image_sizes
    with record_function('dpa.peer.forward'):
        return {'loss': llava(input_ids=input_ids, attention_mask=attention_mask,
                              pixel_values=pixel_values, labels=labels, use_cache=False,
                              **extra).loss}
