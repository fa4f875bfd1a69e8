"""The final AnyRes model as a transformers ``LlavaNextForConditionalGeneration``
directory with its ``LlavaNextProcessor`` (see :mod:`dpa.models.anyres`).

The same checks and compatibility fields as the LLaVA export
(:mod:`dpa.models.export_base`): the directory is reloaded and compared with what
was written, and written so that transformers 4.57 reads it too.
"""
import torch
from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextProcessor)

from dpa.models.export_base import (MULTIMODAL_PRELUDE, ExportUnsupported, check_exportable,
                                    generation_config, generation_tokenizer,
                                    save_transformers_llava, verify_reload)
from dpa.models.hf_compat import write_transformers4_fields


def llava_next_config(model, text_config: dict) -> LlavaNextConfig:
    """The ``LlavaNextConfig`` of an AnyRes ``model`` around ``text_config``."""
    vision, anyres = model.vision_tower, model.anyres
    # for_vision_tower refused CLIP with its CLS kept: 'full' here means no CLS at all.
    strategy = 'default' if vision.has_cls else 'full'
    return LlavaNextConfig(
        vision_config=vision.model.config.to_dict(),
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_grid_pinpoints=anyres.grid_pinpoints,
        image_seq_length=anyres.side * anyres.side,
        projector_hidden_act='gelu',
        vision_feature_select_strategy=strategy,
        vision_feature_layer=vision.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=model.llm.config.tie_word_embeddings)


def export_llava_next(model, tokenizer, image_processor, out_dir: str) -> None:
    """Write ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor``.

    Args:
        model: an AnyRes ``LlavaDPAModel`` (``model.anyres`` set).
        tokenizer: its tokenizer.
        image_processor: the vision tower's own image processor; the export's
            is the ``LlavaNextImageProcessor`` training used
            (:meth:`AnyRes.image_processor`).
        out_dir: the directory to write.

    Raises:
        ExportUnsupported: not an AnyRes model, an LLM that is not a
            transformers-native family, or a projector other than mlp2x_gelu.
        ExportMismatch: the directory would not reload with exactly the
            written weights.
    """
    llm, vision, anyres = model.llm, model.vision_tower, model.anyres
    if anyres is None:
        raise ExportUnsupported('LlavaNextForConditionalGeneration is for anyres models; this '
                                'one takes fixed-size images (use export_llava)')
    check_exportable(model, 'LlavaNextForConditionalGeneration')
    generation = generation_config(llm, tokenizer)
    config = llava_next_config(model, dict(llm.config.to_dict(),
                                           eos_token_id=generation.eos_token_id,
                                           pad_token_id=generation.pad_token_id))
    strategy = config.vision_feature_select_strategy
    with torch.device('meta'):
        next_model = LlavaNextForConditionalGeneration(config)
    save_transformers_llava(next_model, model, tokenizer, generation, out_dir)

    processor = LlavaNextProcessor(
        image_processor=anyres.image_processor(image_processor),
        tokenizer=generation_tokenizer(tokenizer),
        patch_size=anyres.patch_size, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(vision.has_cls),
        chat_template=MULTIMODAL_PRELUDE + tokenizer.chat_template)
    processor.save_pretrained(out_dir)
    write_transformers4_fields(out_dir, vision.model)
    verify_reload(out_dir, next_model.state_dict(), LlavaNextForConditionalGeneration)
