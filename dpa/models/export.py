"""The final model, in the project's own format and as a transformers
``LlavaForConditionalGeneration`` directory with its processor.

Both forms are fed exactly as training fed the model: the saved image
processor pads to a square when training did (``LlavaImageProcessor`` with
``do_pad``, LLaVA's ``expand2square``), the generation config stops at the
chat template's end-of-turn token, and the LLaVA directory is written so that
transformers 5.x and 4.57 (still pinned by many serving and evaluation
stacks) both load it with every weight in place (:mod:`dpa.models.hf_compat`).
"""
import copy
import json
import logging
import os.path as osp
import tempfile
from typing import Callable, List, Optional, Sequence

import torch
from mmengine.logging import print_log
from PIL import Image
from safetensors.torch import save_file
from transformers import (GenerationConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor)
from transformers.utils import is_torchvision_available

from dpa.models.builders import IMAGE_TOKEN
from dpa.models.hf_compat import write_transformers4_fields
from dpa.models.image_preprocessing import preprocess_image
from dpa.models.projector import MLP2xGELUProjector

NATIVE_CONFIG = 'dpa_model.json'

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


def tokenizer_round_trip_problems(tokenizer, texts: Sequence[str], llm_config=None,
                                  reload: Optional[Callable] = None) -> List[str]:
    """Save the tokenizer as the native format does (beside the LLM's
    ``config.json``, which decides the class ``AutoTokenizer`` picks), load it
    back and compare ids and chat template. Returns what differs, one line per
    text.

    Args:
        texts: sample text, e.g. the data's turns.
        llm_config: the LLM's transformers config, saved beside the tokenizer.
        reload: how the directory is loaded (default: ``HFTokenizer``).
    """
    from dpa.models.builders import HFTokenizer
    reload = reload or HFTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        if llm_config is not None:
            llm_config.save_pretrained(tmp)
        generation_tokenizer(tokenizer).save_pretrained(tmp)
        reloaded = reload(tmp)
    problems = []
    if reloaded.chat_template != tokenizer.chat_template:
        problems.append('the chat template changed')
    for text in texts:
        before = tokenizer(text, add_special_tokens=False).input_ids
        after = reloaded(text, add_special_tokens=False).input_ids
        if before != after:
            problems.append(f'{text[:40]!r}: ids {before[:8]} became {after[:8]} '
                            f'(reloaded as {type(reloaded).__name__})')
    return problems


def num_image_tokens(vision) -> int:
    """How many tokens one image becomes in this model (CLS kept with ``full``)."""
    config = vision.model.config
    patches = (config.image_size // config.patch_size) ** 2
    return patches + int(vision.feature_select == 'full' and vision.has_cls)


def save_native(model, tokenizer, image_processor, out_dir: str,
                pad_to_square: bool = False) -> dict:
    """Write the LLM (with tokenizer), vision tower (with image processor) and
    projector, and a config that rebuilds the model from them.

    Args:
        pad_to_square: whether training padded images to a square; the saved
            image processor then does it too.
    """
    llm_dir, vision_dir = osp.join(out_dir, 'llm'), osp.join(out_dir, 'vision_tower')
    llm_dtype = str(next(model.llm.parameters()).dtype).replace('torch.', '')
    checkpoint_code = code_origin(model.llm) == 'checkpoint'

    vision_dtype = str(next(model.vision_tower.parameters()).dtype).replace('torch.', '')
    model.llm.generation_config = generation_config(model.llm, tokenizer)
    model.llm.save_pretrained(llm_dir)
    generation_tokenizer(tokenizer).save_pretrained(llm_dir)
    model.vision_tower.model.save_pretrained(vision_dir)
    if getattr(model, 'anyres', None) is not None:
        image_processor = model.anyres.image_processor(image_processor)
    training_image_processor(image_processor, pad_to_square).save_pretrained(vision_dir)
    save_file(model.projector.state_dict(), osp.join(out_dir, 'projector.safetensors'))
    # Paths are relative to the directory, so it can be moved.
    config = dict(
        type='LlavaDPAModel',
        llm=dict(type='HFCausalLM', pretrained='llm', torch_dtype=llm_dtype,
                 attn_implementation=model.llm.config._attn_implementation,
                 trust_remote_code=checkpoint_code, use_checkpoint_code=checkpoint_code),
        tokenizer=dict(type='HFTokenizer', pretrained='llm', trust_remote_code=checkpoint_code,
                       use_checkpoint_code=checkpoint_code),
        vision_tower=dict(type='HFVisionTower', pretrained='vision_tower',
                          feature_layer=model.vision_tower.feature_layer,
                          feature_select=model.vision_tower.feature_select,
                          torch_dtype=vision_dtype),
        projector=dict(type=model.projector_type),
        projector_weights='projector.safetensors',
        # Not model arguments: how inputs are prepared (load_native drops them).
        image_processor=dict(type='HFImageProcessor', pretrained='vision_tower'),
        pad_to_square=pad_to_square)
    if getattr(model, 'anyres', None) is not None:
        config['anyres'] = model.anyres.config
    with open(osp.join(out_dir, NATIVE_CONFIG), 'w') as f:
        json.dump(config, f, indent=2)
    return config


def native_image_processor(model_dir: str):
    """The image processor of a native model directory: training's whole
    preprocessing (padding included when training padded)."""
    from dpa.models.builders import HFImageProcessor
    return HFImageProcessor(pretrained=osp.join(model_dir, 'vision_tower'))


def load_native(model_dir: str):
    """Rebuild a final model written by :func:`save_native`."""
    from dpa.registry import MODELS
    with open(osp.join(model_dir, NATIVE_CONFIG)) as f:
        config = json.load(f)
    config.pop('image_processor', None)
    config.pop('pad_to_square', None)
    for part in ('llm', 'tokenizer', 'vision_tower'):
        config[part]['pretrained'] = osp.join(model_dir, config[part]['pretrained'])
    config['projector_weights'] = osp.join(model_dir, config['projector_weights'])
    return MODELS.build(config)


def llava_config(model, text_config: dict) -> LlavaConfig:
    """The ``LlavaConfig`` of ``model`` (a :class:`LlavaDPAModel` with a
    transformers-native LLM and the mlp2x_gelu projector) around ``text_config``."""
    vision = model.vision_tower
    strategy = 'default' if vision.feature_select == 'patch' and vision.has_cls else 'full'
    return LlavaConfig(
        vision_config=vision.model.config.to_dict(),
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=num_image_tokens(vision),
        projector_hidden_act='gelu',
        vision_feature_select_strategy=strategy,
        vision_feature_layer=vision.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=model.llm.config.tie_word_embeddings)


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


def planned_export_blocker(llm: dict, projector_type: str) -> Optional[str]:
    """Why the final stage will write no ``hf_llava/`` export, read from the
    config before any model is built (the rules of :func:`check_exportable`),
    or None when it will write one.

    Args:
        llm: the ``llm`` config (``pretrained`` or ``config``).
        projector_type: ``model.projector.type``.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    if llm.get('use_checkpoint_code'):
        return "the LLM runs its checkpoint's own code (use_checkpoint_code)"
    model_type = (llm.get('config') or {}).get('model_type')
    if model_type is None and llm.get('pretrained'):
        path = osp.join(llm['pretrained'], 'config.json')
        if osp.isfile(path):
            with open(path, encoding='utf-8') as f:
                model_type = json.load(f).get('model_type')
    if model_type is not None and model_type not in CONFIG_MAPPING_NAMES:
        return f'{model_type} is not a transformers architecture'
    if projector_type != 'mlp2x_gelu':
        return f'the {projector_type} projector is not LLaVA\'s mlp2x_gelu'
    return None


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


def export_llava(model, tokenizer, image_processor, out_dir: str,
                 pad_to_square: bool = False) -> None:
    """Write ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` to ``out_dir``.

    Args:
        pad_to_square: whether training padded images to a square (the
            exported processor then does it too).

    Raises:
        ExportUnsupported: the LLM is not a transformers-native family (the
            project's InternLM2, a checkpoint's own code), or the projector is
            not LLaVA's two-layer GELU MLP.
        ExportMismatch: the written directory would not reload with exactly
            the written weights, or its processor cannot reproduce training's.

    An AnyRes model (``model.anyres``) is written as
    ``LlavaNextForConditionalGeneration`` instead (:mod:`dpa.models.export_llava_next`).
    """
    if getattr(model, 'anyres', None) is not None:
        from dpa.models.export_llava_next import export_llava_next
        return export_llava_next(model, tokenizer, image_processor, out_dir)
    llm, vision = model.llm, model.vision_tower
    check_exportable(model, 'LlavaForConditionalGeneration')
    cap = getattr(llm.config.get_text_config(), 'final_logit_softcapping', None)
    if cap is not None:
        print_log(f'{type(llm).__name__} soft-caps its logits at {cap} but '
                  'LlavaForConditionalGeneration does not: the export decodes greedily like '
                  'the native model, its probabilities (and sampling) differ', logger='current',
                  level=logging.WARNING)
    processor_images = training_image_processor(image_processor, pad_to_square)
    generation = generation_config(llm, tokenizer)
    config = llava_config(model, dict(llm.config.to_dict(), eos_token_id=generation.eos_token_id,
                                      pad_token_id=generation.pad_token_id))
    strategy = config.vision_feature_select_strategy
    with torch.device('meta'):
        llava = LlavaForConditionalGeneration(config)
    save_transformers_llava(llava, model, tokenizer, generation, out_dir)

    num_cls = 1 if vision.has_cls else 0
    processor = LlavaProcessor(
        image_processor=processor_images, tokenizer=generation_tokenizer(tokenizer),
        patch_size=vision.model.config.patch_size, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=num_cls,
        chat_template=MULTIMODAL_PRELUDE + tokenizer.chat_template)
    processor.save_pretrained(out_dir)
    write_transformers4_fields(out_dir, vision.model)
    verify_reload(out_dir, llava.state_dict())


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
