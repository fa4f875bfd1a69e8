"""The final model, in the project's own format and as a transformers
``LlavaForConditionalGeneration`` directory with its processor."""
import json
import logging
import os.path as osp

import torch
from mmengine.logging import print_log
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from dpa.models.builders import IMAGE_TOKEN
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


class ExportUnsupported(ValueError):
    """The model cannot be written as a transformers LLaVA directory."""


def is_remote_code(llm) -> bool:
    """Whether the LLM's class comes from a checkpoint's own code
    (``trust_remote_code``) rather than from transformers."""
    return not type(llm).__module__.startswith('transformers.')


def save_native(model, tokenizer, image_processor, out_dir: str) -> dict:
    """Write the LLM (with tokenizer), vision tower (with image processor) and
    projector, and a config that rebuilds the model from them."""
    llm_dir, vision_dir = osp.join(out_dir, 'llm'), osp.join(out_dir, 'vision_tower')
    llm_dtype = str(next(model.llm.parameters()).dtype).replace('torch.', '')
    vision_dtype = str(next(model.vision_tower.parameters()).dtype).replace('torch.', '')
    model.llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    model.vision_tower.model.save_pretrained(vision_dir)
    image_processor.save_pretrained(vision_dir)
    save_file(model.projector.state_dict(), osp.join(out_dir, 'projector.safetensors'))
    # Paths are relative to the directory, so it can be moved.
    config = dict(
        type='LlavaDPAModel',
        llm=dict(type='HFCausalLM', pretrained='llm', torch_dtype=llm_dtype,
                 attn_implementation=model.llm.config._attn_implementation,
                 trust_remote_code=is_remote_code(model.llm)),
        tokenizer=dict(type='HFTokenizer', pretrained='llm',
                       trust_remote_code=is_remote_code(model.llm)),
        vision_tower=dict(type='HFVisionTower', pretrained='vision_tower',
                          feature_layer=model.vision_tower.feature_layer,
                          feature_select=model.vision_tower.feature_select,
                          torch_dtype=vision_dtype),
        projector=dict(type=model.projector_type),
        projector_weights='projector.safetensors')
    with open(osp.join(out_dir, NATIVE_CONFIG), 'w') as f:
        json.dump(config, f, indent=2)
    return config


def load_native(model_dir: str):
    """Rebuild a final model written by :func:`save_native`."""
    from dpa.registry import MODELS
    with open(osp.join(model_dir, NATIVE_CONFIG)) as f:
        config = json.load(f)
    for part in ('llm', 'tokenizer', 'vision_tower'):
        config[part]['pretrained'] = osp.join(model_dir, config[part]['pretrained'])
    config['projector_weights'] = osp.join(model_dir, config['projector_weights'])
    return MODELS.build(config)


def export_llava(model, tokenizer, image_processor, out_dir: str) -> None:
    """Write ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` to ``out_dir``.

    Raises:
        ExportUnsupported: the LLM is not a transformers-native family (remote
            code), or the projector is not LLaVA's two-layer GELU MLP.
    """
    llm, vision = model.llm, model.vision_tower
    if is_remote_code(llm):
        raise ExportUnsupported(f'{type(llm).__name__} is remote code, not a transformers-native '
                                'LLM: LlavaForConditionalGeneration cannot hold it')
    if not isinstance(model.projector, MLP2xGELUProjector):
        raise ExportUnsupported('transformers LLaVA needs the mlp2x_gelu projector, this model '
                                f'has {type(model.projector).__name__}')
    cap = getattr(llm.config.get_text_config(), 'final_logit_softcapping', None)
    if cap is not None:
        print_log(f'{type(llm).__name__} soft-caps its logits at {cap} but '
                  'LlavaForConditionalGeneration does not: the export decodes greedily like '
                  'the native model, its probabilities (and sampling) differ', logger='current',
                  level=logging.WARNING)
    strategy = 'default' if vision.feature_select == 'patch' and vision.has_cls else 'full'
    config = LlavaConfig(
        vision_config=vision.model.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=model.image_token_id,
        projector_hidden_act='gelu',
        vision_feature_select_strategy=strategy,
        vision_feature_layer=vision.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=llm.config.tie_word_embeddings)
    with torch.device('meta'):
        llava = LlavaForConditionalGeneration(config)
    state = {f'model.language_model.{k}': v for k, v in llm.get_decoder().state_dict().items()}
    state.update({f'model.vision_tower.{k}': v for k, v in vision.model.state_dict().items()})
    state.update({f'model.multi_modal_projector.{k}': v
                  for k, v in model.projector.state_dict().items()})
    state['lm_head.weight'] = llm.get_output_embeddings().weight
    llava.load_state_dict(state, strict=True, assign=True)
    llava.tie_weights()
    old_vocab = config.text_config.vocab_size
    if model.image_token_id >= old_vocab:
        # The LLM never saw <image> in its vocabulary: give it zero rows
        # (deterministic, unlike mean-resizing) and never generate it.
        llava.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            llava.get_input_embeddings().weight[old_vocab:].zero_()
            llava.get_output_embeddings().weight[old_vocab:].zero_()
        llava.generation_config.suppress_tokens = [model.image_token_id]
    llava.to(next(llm.parameters()).dtype).save_pretrained(out_dir)

    num_cls = 1 if vision.has_cls else 0
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        patch_size=vision.model.config.patch_size, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=num_cls,
        chat_template=MULTIMODAL_PRELUDE + tokenizer.chat_template)
    processor.save_pretrained(out_dir)
