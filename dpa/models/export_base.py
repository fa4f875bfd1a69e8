"""What the transformers exports of the final model share: the chat-template
prelude for multimodal messages, the generation config that stops at the end
of an assistant turn, the image processor that reproduces training's
preprocessing, filling a meta-built LLaVA with the model's weights, and the
reload check. :mod:`dpa.models.export` (``LlavaForConditionalGeneration``)
and :mod:`dpa.models.export_llava_next` (``LlavaNextForConditionalGeneration``)
both build on it.
"""
import copy

import torch
from PIL import Image
from transformers import GenerationConfig, LlavaForConditionalGeneration
from transformers.utils import is_torchvision_available

from dpa.models.builders import IMAGE_TOKEN
from dpa.models.image_preprocessing import preprocess_image
from dpa.models.projector import MLP2xGELUProjector

# Lets the processor take the standard multimodal message format (content as a
# list of {"type": "image"} and {"type": "text"} parts) with any LLM's own chat
# template: parts are flattened to the "<image>\n" + text strings it was trained on.
MULTIMODAL_PRELUDE = (
    "{%- set flattened = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set flattened.messages = flattened.messages + [message] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '" + IMAGE_TOKEN +
    "\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set flattened.messages = flattened.messages + "
    "[{'role': message['role'], 'content': text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = flattened.messages -%}")
# The image processor settings LlavaImageProcessor shares with CLIP's and SigLIP's.
SHARED_PROCESSOR_KEYS = ('do_convert_rgb', 'do_resize', 'size', 'resample', 'do_center_crop',
                         'crop_size', 'do_rescale', 'rescale_factor', 'do_normalize',
                         'image_mean', 'image_std')
_PROBE_ANSWER = 'dpa end of turn probe'


class ExportUnsupported(ValueError):
    """The model cannot be written as a transformers LLaVA directory."""


class ExportMismatch(RuntimeError):
    """A written model or processor would not behave like the trained one."""


def code_origin(llm) -> str:
    """Whose code the LLM runs: ``'transformers'``, ``'dpa'`` (a family the
    project implements, e.g. InternLM2) or ``'checkpoint'`` (the checkpoint's
    own ``.py`` files, ``trust_remote_code``)."""
    module = type(llm).__module__
    if module.startswith('transformers.'):
        return 'transformers'
    return 'dpa' if module.startswith('dpa.') else 'checkpoint'


def training_image_processor(image_processor, pad_to_square: bool):
    """An image processor that does all of training's preprocessing in one call.

    Without ``pad_to_square`` that is the vision tower's own processor. With it,
    a ``LlavaImageProcessor`` with ``do_pad=True`` and the same settings; it is
    checked on non-square probes against training's pipeline
    (:func:`preprocess_image`).

    Raises:
        ExportMismatch: the processor cannot reproduce training's pixels.
    """
    if not pad_to_square:
        return image_processor
    settings = {k: v for k, v in image_processor.to_dict().items() if k in SHARED_PROCESSOR_KEYS}
    # A step the processor does not have (SigLIP: no centre crop) stays off.
    settings.setdefault('do_center_crop', False)
    padded = _llava_image_processor_class()(**settings, do_pad=True)
    for size in ((61, 23), (17, 50)):
        probe = _probe_image(size)
        expected = preprocess_image(probe, image_processor, pad_to_square=True)
        actual = padded(images=probe, return_tensors='pt').pixel_values[0]
        if actual.shape != expected.shape or not torch.equal(actual, expected):
            raise ExportMismatch(
                f'{type(image_processor).__name__} cannot be expressed as a padding '
                f'LlavaImageProcessor: on a {size[0]}x{size[1]} image its pixel values differ '
                'from training\'s; export the model with pad_to_square=False only if it was '
                'trained that way')
    return padded


def _llava_image_processor_class():
    # Both backends save as "LlavaImageProcessor"; asking for the torchvision
    # one without torchvision only adds a fallback warning.
    import transformers
    name = 'LlavaImageProcessor' if is_torchvision_available() else 'LlavaImageProcessorPil'
    return getattr(transformers, name)


def _probe_image(size):
    gen = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def end_of_turn_ids(tokenizer) -> list:
    """The special token the chat template puts right after an assistant
    answer (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), as a list."""
    if not tokenizer.chat_template:
        return []
    messages = [{'role': 'user', 'content': 'hello'},
                {'role': 'assistant', 'content': _PROBE_ANSWER}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    after = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    return ids[:1] if ids and ids[0] in set(tokenizer.all_special_ids) else []


def stop_token_ids(tokenizer, generation_config=None) -> list:
    """Every id that ends an answer, in order: the chat template's end-of-turn
    token, the generation config's eos ids (e.g. Llama-3.1's three), the
    tokenizer's eos."""
    own = getattr(generation_config, 'eos_token_id', None)
    own = [] if own is None else [own] if isinstance(own, int) else list(own)
    ids = []
    for token_id in end_of_turn_ids(tokenizer) + own + [tokenizer.eos_token_id]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def generation_config(llm, tokenizer) -> GenerationConfig:
    """The LLM's generation config (its sampling defaults kept) that stops at
    the end of an assistant turn and pads with the tokenizer's pad token."""
    config = copy.deepcopy(getattr(llm, 'generation_config', None)) or GenerationConfig()
    eos = stop_token_ids(tokenizer, config)
    # Written by us now: generate() must not rebuild it from the model config.
    config._from_model_config = False
    config.eos_token_id = eos
    config.pad_token_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                           else eos[0] if eos else None)
    return config


def generation_tokenizer(tokenizer):
    """A copy of the tokenizer that pads batches on the left, as generation needs."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = 'left'
    tokenizer.init_kwargs['padding_side'] = 'left'  # what save_pretrained writes
    return tokenizer


def check_exportable(model, target: str) -> None:
    """Raise ExportUnsupported unless transformers' ``target`` class can hold
    ``model``: a transformers-native LLM and LLaVA's two-layer GELU projector."""
    llm = model.llm
    if code_origin(llm) != 'transformers':
        raise ExportUnsupported(f'{type(llm).__name__} is not a transformers-native LLM '
                                f'({code_origin(llm)} code): {target} cannot hold it')
    if not isinstance(model.projector, MLP2xGELUProjector):
        raise ExportUnsupported(f'{target} needs the mlp2x_gelu projector, this model has '
                                f'{type(model.projector).__name__}')


def save_transformers_llava(hf_model, model, tokenizer, generation: GenerationConfig,
                            out_dir: str) -> None:
    """Fill a meta-built transformers LLaVA (or LLaVA-NeXT) with ``model``'s
    weights, its generation config and the ``<image>`` row it may lack, and save it.

    Args:
        hf_model: ``LlavaForConditionalGeneration`` or
            ``LlavaNextForConditionalGeneration`` built on the meta device.
        model: the :class:`LlavaDPAModel` whose weights it takes (an AnyRes
            model's ``image_newline`` goes to ``model.image_newline``).
        generation: its generation config (gains ``suppress_tokens`` when the
            vocabulary is resized).
    """
    llm, vision = model.llm, model.vision_tower
    projector = dict(model.projector.state_dict())
    newline = projector.pop('image_newline', None)
    scale = getattr(vision, 'feature_scale', 1.0)
    if scale != 1.0:
        # linear_1(s * x) == (s * W) x + b: transformers' LLaVA has no feature scale.
        projector['linear_1.weight'] = projector['linear_1.weight'] * scale
    state = {f'model.language_model.{k}': v for k, v in llm.get_decoder().state_dict().items()}
    state.update({f'model.vision_tower.{k}': v for k, v in vision.model.state_dict().items()})
    state.update({f'model.multi_modal_projector.{k}': v for k, v in projector.items()})
    if newline is not None:
        state['model.image_newline'] = newline
    state['lm_head.weight'] = llm.get_output_embeddings().weight
    hf_model.load_state_dict(state, strict=True, assign=True)
    hf_model.tie_weights()
    old_vocab = hf_model.config.text_config.vocab_size
    if model.image_token_id >= old_vocab:
        # The LLM never saw <image> in its vocabulary: give it zero rows
        # (deterministic, unlike mean-resizing) and never generate it.
        hf_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            hf_model.get_input_embeddings().weight[old_vocab:].zero_()
            hf_model.get_output_embeddings().weight[old_vocab:].zero_()
        generation.suppress_tokens = [model.image_token_id]
    hf_model.generation_config = generation
    hf_model.to(next(llm.parameters()).dtype).save_pretrained(out_dir)


def verify_reload(out_dir: str, written: dict,
                  model_class=LlavaForConditionalGeneration) -> None:
    """Reload the export as transformers will and compare every tensor with
    what was written: a renamed or missing key would otherwise come back
    randomly initialised with only a warning.

    Raises:
        ExportMismatch: naming the keys that would not come back as written.
    """
    reloaded, info = model_class.from_pretrained(
        out_dir, output_loading_info=True, dtype=next(iter(written.values())).dtype)
    problems = {name: sorted(info[name]) for name in ('missing_keys', 'unexpected_keys',
                                                      'mismatched_keys') if info.get(name)}
    state = reloaded.state_dict()
    changed = sorted(k for k, v in written.items()
                     if k in state and not torch.equal(state[k], v.to(state[k].device)))
    if changed:
        problems['reloaded_with_other_values'] = changed
    if problems:
        raise ExportMismatch(f'{out_dir} does not reload as written ({problems}); this is a bug '
                             'of the export, please report it with the transformers version')
