"""The final model, in the project's own format and as a transformers
``LlavaForConditionalGeneration`` directory with its processor.

Both forms are fed exactly as training fed the model: the saved image
processor pads to a square when training did (``LlavaImageProcessor`` with
``do_pad``, LLaVA's ``expand2square``), the generation config stops at the
chat template's end-of-turn token, and the LLaVA directory is written so that
transformers 5.x and 4.57 (still pinned by many serving and evaluation
stacks) both load it with every weight in place (:mod:`dpa.models.hf_compat`).
"""
import json
import logging
import os.path as osp
import tempfile
from typing import Callable, List, Optional, Sequence

import torch
from mmengine.logging import print_log
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from dpa.models.export_base import (MULTIMODAL_PRELUDE, check_exportable, code_origin,
                                    generation_config, generation_tokenizer,
                                    save_transformers_llava, training_image_processor,
                                    verify_reload)
from dpa.models.export_llava_next import export_llava_next
from dpa.models.hf_compat import write_transformers4_fields

NATIVE_CONFIG = 'dpa_model.json'


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
                          image_size=model.vision_tower.image_size,
                          feature_scale=model.vision_tower.feature_scale,
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
