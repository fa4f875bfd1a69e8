"""The model under evaluation, fed exactly as training fed it.

Three inputs are accepted: a finished work dir (its ``finetune`` stage's final
model, in the native format), a native model directory (``dpa_model.json``,
see :func:`dpa.models.export.save_native`) and a transformers LLaVA export
(``hf_llava/``). Both kinds of model offer the same small interface to the
scorer: the prompt of a row as token ids with its image, left-padded forward
passes that return the logits of the last positions only, and greedy
generation.

An image is one ``pixel_values`` tensor (channels, height, width), or for an
AnyRes (LLaVA-NeXT) model an :class:`AnyResImage`: its tiles and its size,
with as many ``<image>`` ids in the prompt as that size gives.
"""
import inspect
import json
import logging
import os.path as osp
from typing import List, NamedTuple, Optional, Sequence

import torch
from mmengine.logging import print_log
from PIL import Image
from safetensors import SafetensorError

from dpa.datasets.llava import open_image
from dpa.artifacts import (ArtifactError, StaleArtifactError, read_current_manifest,
                           read_manifest, verify_artifact_folder)
from dpa.models.builders import IMAGE_TOKEN, PROCESSORS, num_image_tokens
from dpa.models.export import NATIVE_CONFIG, load_native
from dpa.models.export_base import stop_token_ids
from dpa.models.image_preprocessing import preprocess_image

FINAL_STAGE = 'finetune'
# Every shipped base config trains with LLaVA-1.5's padding to a square.
DEFAULT_PAD_TO_SQUARE = True


class ModelLoadError(ValueError):
    """The path is not a model or work dir the evaluator can load."""


class AnyResImage(NamedTuple):
    """One image of an AnyRes model: ``tiles`` (tiles, channels, height,
    width), the base tile first, and ``size`` (height, width) of the original."""
    tiles: torch.Tensor
    size: torch.Tensor


def chat_prompt(tokenizer, question: str, has_image: bool) -> str:
    """The chat template applied to one user turn (the image, then the
    question), with the generation prompt: the text training's ``chat``
    template puts before an answer."""
    content = f'{IMAGE_TOKEN}\n{question}' if has_image else question
    return tokenizer.apply_chat_template([dict(role='user', content=content)],
                                         add_generation_prompt=True, tokenize=False)


def end_of_turn_ids(tokenizer, generation_config=None) -> List[int]:
    """Token ids that end an answer (see :func:`dpa.models.export_base.stop_token_ids`):
    the chat template's end-of-turn token, the generation config's and the
    tokenizer's eos."""
    ids = stop_token_ids(tokenizer, generation_config)
    if not ids:
        raise ModelLoadError('the tokenizer has no eos token and its chat template no special '
                             'end-of-turn token: open questions could not stop')
    return ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int):
    """``(input_ids, attention_mask, position_ids)`` with every row ending at
    the last column; real tokens get positions 0..n-1, as without padding."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        if len(seq):
            input_ids[row, length - len(seq):] = torch.as_tensor(seq)
            attention_mask[row, length - len(seq):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def cache_keyword(llm) -> Optional[str]:
    """The keyword by which ``llm`` (or the model a PEFT wrapper holds) takes
    a key/value cache: ``cache`` (transformers 5.25 on), ``past_key_values``
    (before), None when its forward takes neither (the scorer then runs every
    option's full sequence)."""
    base = llm.get_base_model() if hasattr(llm, 'get_base_model') else llm
    parameters = inspect.signature(base.forward).parameters
    return next((name for name in ('cache', 'past_key_values') if name in parameters), None)


def returned_cache(outputs):
    """The key/value cache a forward pass returned, or None."""
    cache = outputs.get('cache')
    return outputs.get('past_key_values') if cache is None else cache


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


class NativeEvalModel:
    """A ``LlavaDPAModel`` with the tokenizer, image processor and image
    preprocessing (``pad_to_square``) it was trained with.

    Args:
        model: the model (moved to ``device``, eval mode).
        tokenizer / image_processor: its processors.
        image_tokens: ``<image>`` ids per image.
        pad_to_square: pad images to a square with the mean colour first.
        device: where the forward passes run.
        name: the directory it came from, for reports.
    """
    kind = 'native'

    def __init__(self, model, tokenizer, image_processor, image_tokens: int,
                 pad_to_square: bool, device='cpu', name: str = ''):
        self.model = model.to(device).eval()
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_tokens, self.pad_to_square = image_tokens, pad_to_square
        self.anyres = model.anyres
        if self.anyres is not None:
            # The dataset's tiling processor, so the tiles are training's.
            self.image_processor = self.anyres.image_processor(image_processor)
        self.device, self.name = torch.device(device), name
        self.image_token_id = model.image_token_id
        self.pad_id = tokenizer.pad_token_id
        self.end_of_turn_ids = end_of_turn_ids(tokenizer, getattr(model.llm, 'generation_config',
                                                                  None))
        # How the LLM takes a key/value cache (see prompt_pass); None: it takes none.
        self.prefix_cache = cache_keyword(model.llm)

    def image_input(self, image: Image.Image):
        """``(number of <image> ids, pixel values)`` of one image, as training
        preprocesses it (an :class:`AnyResImage` for an AnyRes model)."""
        if self.anyres is None:
            return self.image_tokens, preprocess_image(image, self.image_processor,
                                                       self.pad_to_square)
        out = self.anyres.preprocess(image, self.image_processor)
        return (self.anyres.num_tokens(out['image_size'].tolist()),
                AnyResImage(out['pixel_values'], out['image_size']))

    def prompt(self, question: str, image: Optional[Image.Image]):
        """``(token ids, pixel values or None)`` of one row, as training builds them."""
        text = chat_prompt(self.tokenizer, question, image is not None)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if image is None:
            return ids, None
        count, pixels = self.image_input(image)
        at = ids.index(self.image_token_id)
        return ids[:at] + [self.image_token_id] * count + ids[at + 1:], pixels

    def _inputs(self, sequences, pixel_values):
        input_ids, attention_mask, position_ids = (
            t.to(self.device) for t in left_pad(sequences, self.pad_id))
        pixels = image_sizes = None
        if pixel_values and self.anyres is not None:
            pixels = torch.cat([image.tiles for image in pixel_values]).to(self.device)
            image_sizes = torch.stack([image.size for image in pixel_values]).to(self.device)
        elif pixel_values:
            pixels = torch.stack(pixel_values).to(self.device)
        embeds, _ = self.model.embed(input_ids, pixels, image_sizes)
        return embeds, attention_mask, position_ids

    def _llm(self, embeds, attention_mask, position_ids, keep: int = 0, cache=None,
             use_cache: bool = False):
        llm = self.model.llm
        kwargs = dict(inputs_embeds=embeds, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=use_cache)
        if keep and _accepts(llm.forward, 'logits_to_keep'):
            kwargs['logits_to_keep'] = keep
        if cache is not None:
            kwargs[self.prefix_cache] = cache
        return llm(**kwargs)

    @torch.no_grad()
    def last_logits(self, sequences, pixel_values, keep: int) -> torch.Tensor:
        """Float32 logits of the last ``keep`` positions of each left-padded
        sequence: (batch, keep, vocab). The LLM is fed as in
        ``LlavaDPAModel.forward`` (same embeddings, mask and position ids)."""
        embeds, attention_mask, position_ids = self._inputs(sequences, pixel_values)
        return self._llm(embeds, attention_mask, position_ids, keep).logits[:, -keep:].float()

    @torch.no_grad()
    def prompt_pass(self, sequences, pixel_values):
        """One pass over left-padded prompts that keeps their keys and values:
        ``(float32 logits of the last position (batch, vocab), the cache, the
        attention mask (batch, length))``, for :meth:`continuation_logits`."""
        embeds, attention_mask, position_ids = self._inputs(sequences, pixel_values)
        out = self._llm(embeds, attention_mask, position_ids, keep=1, use_cache=True)
        return out.logits[:, -1].float(), returned_cache(out), attention_mask

    @torch.no_grad()
    def continuation_logits(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Float32 logits (batch, length, vocab) of text ids that continue the
        prompts held in ``cache`` (one cache row per row of ``input_ids``);
        ``attention_mask`` covers the cached positions and these."""
        embeds, _ = self.model.embed(input_ids.to(self.device), None)
        return self._llm(embeds, attention_mask.to(self.device), position_ids.to(self.device),
                         cache=cache, use_cache=True).logits.float()

    @torch.no_grad()
    def generate(self, sequences, pixel_values, max_new_tokens: int,
                 streamer=None) -> List[List[int]]:
        """Greedy continuations (new ids only) of left-padded sequences,
        streamed to a transformers ``streamer`` when one is given."""
        embeds, attention_mask, _ = self._inputs(sequences, pixel_values)
        # generate() derives position ids from the mask as forward() does.
        out = self.model.llm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, eos_token_id=self.end_of_turn_ids,
            pad_token_id=self.pad_id, streamer=streamer)
        return out.tolist()


class HFLlavaEvalModel:
    """A transformers ``LlavaForConditionalGeneration`` (or, from an AnyRes
    model, ``LlavaNextForConditionalGeneration``) export with its processor
    (``AutoProcessor``), fed as any transformers user would.

    Args:
        model_dir: the ``hf_llava`` directory.
        device: where the forward passes run.
    """
    kind = 'hf_llava'

    def __init__(self, model_dir: str, device='cpu'):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype='auto')
        self.model.to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.device, self.name = torch.device(device), model_dir
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.end_of_turn_ids = end_of_turn_ids(self.tokenizer, self.model.generation_config)
        self.prefix_cache = cache_keyword(self.model)

    def prompt(self, question: str, image: Optional[Image.Image]):
        text = chat_prompt(self.tokenizer, question, image is not None)
        # The template already holds any bos token; training adds none either.
        inputs = self.processor(text=text, images=[image] if image is not None else None,
                                add_special_tokens=False, return_tensors='pt')
        pixels = image_inputs(inputs)[0] if image is not None else None
        return inputs['input_ids'][0].tolist(), pixels

    def _inputs(self, sequences, pixel_values):
        input_ids, attention_mask, position_ids = (
            t.to(self.device) for t in left_pad(sequences, self.pad_id))
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=None)
        if pixel_values and isinstance(pixel_values[0], AnyResImage):
            # LLaVA-NeXT takes (images, tiles, ...) padded to the most tiles and
            # drops each image's padding by its size.
            most = max(len(image.tiles) for image in pixel_values)
            inputs['pixel_values'] = torch.stack([
                torch.cat([image.tiles, image.tiles.new_zeros(most - len(image.tiles),
                                                              *image.tiles.shape[1:])])
                for image in pixel_values]).to(self.device, self.model.dtype)
            inputs['image_sizes'] = torch.stack([image.size for image in pixel_values]
                                                ).to(self.device)
        elif pixel_values:
            inputs['pixel_values'] = torch.stack(pixel_values).to(self.device, self.model.dtype)
        return inputs, position_ids

    @torch.no_grad()
    def last_logits(self, sequences, pixel_values, keep: int) -> torch.Tensor:
        inputs, position_ids = self._inputs(sequences, pixel_values)
        # Explicit position ids: the model's default (0..T-1) ignores left padding.
        out = self.model(**inputs, position_ids=position_ids, logits_to_keep=keep,
                         use_cache=False)
        return out.logits[:, -keep:].float()

    @torch.no_grad()
    def prompt_pass(self, sequences, pixel_values):
        """See :meth:`NativeEvalModel.prompt_pass`."""
        inputs, position_ids = self._inputs(sequences, pixel_values)
        out = self.model(**inputs, position_ids=position_ids, logits_to_keep=1, use_cache=True)
        return out.logits[:, -1].float(), returned_cache(out), inputs['attention_mask']

    @torch.no_grad()
    def continuation_logits(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """See :meth:`NativeEvalModel.continuation_logits`."""
        out = self.model(input_ids=input_ids.to(self.device),
                         attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), use_cache=True,
                         **{self.prefix_cache: cache})
        return out.logits.float()

    @torch.no_grad()
    def generate(self, sequences, pixel_values, max_new_tokens: int,
                 streamer=None) -> List[List[int]]:
        inputs, _ = self._inputs(sequences, pixel_values)
        # transformers 5's generate() runs the vision tower on any pixel_values
        # key, None included: a text-only batch must not pass one.
        inputs = {k: v for k, v in inputs.items() if v is not None}
        out = self.model.generate(**inputs, do_sample=False, num_beams=1,
                                  max_new_tokens=max_new_tokens,
                                  eos_token_id=self.end_of_turn_ids, pad_token_id=self.pad_id,
                                  streamer=streamer)
        return out[:, inputs['input_ids'].shape[1]:].tolist()


class CausalLMScorer:
    """A bare transformers causal LM (text only) behind the scorer's interface
    (``last_logits``, ``prompt_pass``, ``continuation_logits``), so that
    :func:`dpa.evaluation.evaluator.score_continuations` scores continuations
    of plain text prompts the way the evaluator scores options (the
    real-prior gates use it).

    Args:
        llm: the causal LM (eval mode).
        pad_id: the id that fills padding (masked out; any id in the vocabulary).
    """
    kind = 'causal_lm'

    def __init__(self, llm, pad_id: int = 0):
        self.llm, self.pad_id = llm, pad_id
        self.device = next(llm.parameters()).device
        self.prefix_cache = cache_keyword(llm)

    def _call(self, input_ids, attention_mask, position_ids, keep: int = 0, cache=None,
              use_cache: bool = False):
        kwargs = dict(input_ids=input_ids.to(self.device),
                      attention_mask=attention_mask.to(self.device),
                      position_ids=position_ids.to(self.device), use_cache=use_cache)
        if keep and _accepts(self.llm.forward, 'logits_to_keep'):
            kwargs['logits_to_keep'] = keep
        if cache is not None:
            kwargs[self.prefix_cache] = cache
        return self.llm(**kwargs)

    @torch.no_grad()
    def last_logits(self, sequences, pixel_values, keep: int) -> torch.Tensor:
        if pixel_values:
            raise ValueError('a bare causal LM scores text only')
        out = self._call(*left_pad(sequences, self.pad_id), keep=keep)
        return out.logits[:, -keep:].float()

    @torch.no_grad()
    def prompt_pass(self, sequences, pixel_values):
        if pixel_values:
            raise ValueError('a bare causal LM scores text only')
        input_ids, attention_mask, position_ids = left_pad(sequences, self.pad_id)
        out = self._call(input_ids, attention_mask, position_ids, keep=1, use_cache=True)
        return out.logits[:, -1].float(), returned_cache(out), attention_mask.to(self.device)

    @torch.no_grad()
    def continuation_logits(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        return self._call(input_ids, attention_mask, position_ids, cache=cache,
                          use_cache=True).logits.float()


def image_inputs(processed) -> list:
    """The images of a transformers processor's output, one per image: a
    ``pixel_values`` tensor, or an :class:`AnyResImage` when the processor
    tiles (LLaVA-NeXT: ``image_sizes`` present)."""
    if 'image_sizes' not in processed:
        return list(processed['pixel_values'])
    return [AnyResImage(tiles, size.long())
            for tiles, size in zip(processed['pixel_values'], processed['image_sizes'])]


def _native_pad_to_square(config: dict, model_dir: str, override: Optional[bool]) -> bool:
    if override is not None:
        return override
    if 'pad_to_square' in config:
        return bool(config['pad_to_square'])
    print_log(f'{osp.join(model_dir, NATIVE_CONFIG)} does not record pad_to_square (written by '
              f'an older version): assuming {DEFAULT_PAD_TO_SQUARE}, as every shipped base '
              'config trains; pass --pad-to-square / --no-pad-to-square if the model was '
              'trained otherwise', logger='current', level=logging.WARNING)
    return DEFAULT_PAD_TO_SQUARE


def load_native_for_eval(model_dir: str, device='cpu',
                         pad_to_square: Optional[bool] = None) -> NativeEvalModel:
    """A native model directory as a :class:`NativeEvalModel`.

    Args:
        model_dir: directory written by ``save_native``.
        device: where to run it.
        pad_to_square: how training preprocessed images; None reads it from
            ``dpa_model.json`` (key ``pad_to_square``).
    """
    with open(osp.join(model_dir, NATIVE_CONFIG)) as f:
        config = json.load(f)
    model = load_native(model_dir)
    tokenizer = PROCESSORS.build(dict(config['tokenizer'],
                                      pretrained=osp.join(model_dir, 'llm')))
    vision = dict(config['vision_tower'],
                  pretrained=osp.join(model_dir, config['vision_tower']['pretrained']))
    image_processor = PROCESSORS.build(dict(type='HFImageProcessor',
                                            pretrained=vision['pretrained']))
    return NativeEvalModel(model, tokenizer, image_processor, num_image_tokens(vision),
                           _native_pad_to_square(config, model_dir, pad_to_square), device,
                           name=model_dir)


def resolve_model_dir(path: str, verify: bool = True) -> str:
    """The model directory behind ``path``: a work dir's final model, or
    ``path`` itself when it is a native or ``hf_llava`` directory.

    ``verify``: check the model's files against the sha256 its stage's
    manifest recorded (when a manifest covers them), so that a corrupted
    or edited model is refused rather than scored, and refuse a stale one
    (made from an earlier artifact of its work dir that changed since, e.g.
    align trained again: :func:`dpa.artifacts.read_current_manifest`, the
    check the pipeline applies before it skips a stage).
    """
    if not osp.isdir(path):
        raise ModelLoadError(f'{path} is not a directory; give a work dir, a native model dir '
                             '(with dpa_model.json) or an hf_llava dir (with config.json)')
    try:
        if osp.isfile(osp.join(path, NATIVE_CONFIG)) or osp.isfile(osp.join(path, 'config.json')):
            if verify:
                verify_artifact_folder(path)
            return path
        manifest = (read_current_manifest if verify else read_manifest)(path, FINAL_STAGE,
                                                                        verify=verify)
    except StaleArtifactError as err:
        raise ModelLoadError(f'{err.explain()}\n(--no-verify loads the stale model anyway)'
                             ) from None
    except ArtifactError as err:
        raise ModelLoadError(f'{err}\n(--no-verify loads the model without this check, for '
                             'very large checkpoints you trust)') from None
    if manifest is not None:
        return manifest['artifact']
    if osp.isdir(osp.join(path, FINAL_STAGE)):
        raise ModelLoadError(f'{path}: the {FINAL_STAGE} stage has not finished '
                             f'({osp.join(path, FINAL_STAGE, "manifest.json")} is missing); '
                             'finish training (tools/train.py CONFIG --resume) first')
    raise ModelLoadError(f'{path} is neither a work dir (no {FINAL_STAGE}/manifest.json), a '
                         f'native model dir (no {NATIVE_CONFIG}) nor an hf_llava dir (no '
                         'config.json)')


def check_device(device: str) -> str:
    """``device`` if this machine and torch build can run on it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f'--device {device!r} is not a device ({err}); use cpu, cuda or '
                             'cuda:N') from None
    if parsed.type == 'cuda':
        if not torch.cuda.is_available():
            raise ModelLoadError(f'--device {device!r}: this torch build or machine has no CUDA '
                                 'GPU; use --device cpu')
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadError(f'--device {device!r}: there are only '
                                 f'{torch.cuda.device_count()} CUDA devices')
    elif parsed.type == 'mps' and not torch.backends.mps.is_available():
        raise ModelLoadError(f'--device {device!r}: this machine has no MPS device; use '
                             '--device cpu')
    elif parsed.type not in ('cpu', 'mps'):
        raise ModelLoadError(f'--device {device!r}: evaluation runs on cpu, cuda or mps')
    return device


def load_eval_model(path: str, device='cpu', pad_to_square: Optional[bool] = None,
                    verify: bool = True):
    """The model at ``path`` (work dir, native dir or ``hf_llava`` dir), ready to score.

    Args:
        path: see :func:`resolve_model_dir`.
        device: e.g. ``'cpu'``, ``'cuda'``, ``'cuda:1'``.
        pad_to_square: native models only: override the recorded preprocessing.
        verify: check the model's files against its manifest's sha256 first.
    """
    check_device(str(device))
    model_dir = resolve_model_dir(path, verify)
    try:
        if osp.isfile(osp.join(model_dir, NATIVE_CONFIG)):
            return load_native_for_eval(model_dir, device, pad_to_square)
        with open(osp.join(model_dir, 'config.json')) as f:
            model_type = json.load(f).get('model_type')
    except (OSError, ValueError, SafetensorError) as err:
        # ValueError: json or a builder refusing a broken file (--no-verify).
        raise ModelLoadError(f'cannot load the model in {model_dir}: {err}') from None
    if model_type not in ('llava', 'llava_next'):
        raise ModelLoadError(f'{model_dir}/config.json is a {model_type!r} model, not a '
                             'transformers LLaVA or LLaVA-NeXT export (model_type "llava" or '
                             '"llava_next")')
    if pad_to_square is not None:
        raise ModelLoadError('--pad-to-square applies to native models; an hf_llava export '
                             'preprocesses images with its own processor')
    try:
        return HFLlavaEvalModel(model_dir, device)
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelLoadError(f'cannot load the model in {model_dir}: {err}') from None


def load_image(path: Optional[str]) -> Optional[Image.Image]:
    return None if path is None else open_image(path)
