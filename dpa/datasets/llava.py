"""LLaVA-format datasets: json or jsonl rows with an optional ``image`` (relative
to an image folder) and ``conversations`` of human/gpt turns."""
import json
import math
import os.path as osp
import warnings
from collections import Counter
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from jinja2 import TemplateError
from mmengine.dataset import BaseDataset
from PIL import Image

from dpa.datasets.reference_chat import (ReferenceFormatError, reference_chat_tokens,
                                         reference_family)
from dpa.models.anyres import AnyRes
from dpa.models.builders import IMAGE_TOKEN, PROCESSORS
from dpa.models.image_preprocessing import expand_to_square, preprocess_image  # noqa: F401
from dpa.models.losses import IGNORE_INDEX
from dpa.registry import DATASETS, FUNCTIONS

TEMPLATES = ('caption_text', 'plain', 'chat')
# 'eos': the project's caption ending; '\n': the reference's (LLaVA's plain separator).
CAPTION_SUFFIXES = ('eos', '\n')
LABEL_MODES = ('assistant', 'reference')
ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
         'system': 'system'}


class AllRowsBad(ValueError):
    """Every row of a dataset is bad: there is nothing to train on."""


class BadSampleError(ValueError):
    """A data row that cannot become a training sample.

    Args:
        reason: a short snake_case code (``missing_image``, ``too_long``, ...).
        detail: what exactly is wrong, for a person.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f'{reason}: {detail}')
        self.reason, self.detail = reason, detail


def bad_row_record(source: str, row_index: int, row, err: BadSampleError) -> dict:
    """How a bad row is reported: file, 0-based row, id, reason code, detail."""
    row_id = row.get('id') if isinstance(row, dict) else None
    return dict(file=source, row=row_index, id=row_id, reason=err.reason, detail=err.detail)


def read_rows(path: str, problems: Optional[List[dict]] = None) -> List[Tuple[int, dict]]:
    """(row index, row) pairs of a LLaVA json (a list) or jsonl (one object a
    line) file, with or without a UTF-8 byte-order mark. Invalid jsonl lines are
    appended to ``problems`` and skipped; without ``problems`` they raise.

    Raises:
        ValueError: a json file that is not a json list (the whole file is unusable).
    """
    if not path.endswith('.jsonl'):
        try:
            # utf-8-sig: editors on Windows start files with a BOM, which json rejects.
            with open(path, encoding='utf-8-sig') as f:
                rows = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f'{path} is not valid json ({err}); a LLaVA json file holds '
                             'a list of rows, use .jsonl for one row a line') from None
        if not isinstance(rows, list):
            raise ValueError(f'{path}: a LLaVA json file holds a list of rows, got '
                             f'{type(rows).__name__}')
        return list(enumerate(rows))
    rows = []
    with open(path, 'rb') as f:
        for index, line in enumerate(f):
            try:
                # A line at a time, so one line of other bytes is one bad row.
                text = line.decode('utf-8-sig' if index == 0 else 'utf-8')
                if not text.strip():
                    continue
                rows.append((index, json.loads(text)))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                bad = BadSampleError('invalid_json', f'line {index + 1}: {err}')
                if problems is None:
                    raise bad from None
                problems.append(bad_row_record(path, index, None, bad))
    return rows


def _describe(value) -> str:
    """A JSON value for a message: its type and a short excerpt."""
    text = repr(value)
    return f'{type(value).__name__} {text[:60]}{"..." if len(text) > 60 else ""}'


def _check_text(text: str, where: str) -> None:
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as err:  # e.g. a lone surrogate escaped in the json
        raise BadSampleError('bad_text', f'{where} is not valid unicode text ({err.reason} at '
                             f'character {err.start})') from None


def validate_row(row) -> Tuple[List[dict], Optional[str]]:
    """The schema check of one LLaVA row, shared by ``check_data`` and training:
    every field's JSON type and shape, before anything uses it.

    Returns:
        ``(messages, image)``: the turns as chat messages and the image path
        (None for a text-only row, which leaves the ``image`` key out).

    Raises:
        BadSampleError: ``not_an_object``, ``bad_id``, ``bad_image_field``,
            ``no_conversations``, ``bad_turn``, ``unknown_role``, ``empty_text``,
            ``ends_with_user_turn``, ``bad_text`` or ``image_tag_misplaced``.
    """
    if not isinstance(row, dict):
        raise BadSampleError('not_an_object', f'a row is a json object, got {_describe(row)}')
    row_id = row.get('id')
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise BadSampleError('bad_id', f'id must be a string or an integer, got '
                             f'{_describe(row_id)}')
    image = row.get('image')
    if 'image' in row:
        if not isinstance(image, str) or not image.strip():
            raise BadSampleError('bad_image_field', 'image must be a non-empty path string (leave '
                                 f'the key out for a text-only row), got {_describe(image)}')
        _check_text(image, 'image')
    messages = conversation_messages(row)
    for message in messages:
        if message['role'] != 'user' and IMAGE_TOKEN in message['content']:
            raise BadSampleError('image_tag_misplaced', f'{IMAGE_TOKEN} in a {message["role"]} '
                                 'turn; it belongs in a human turn')
    return messages, image


def conversation_messages(row) -> List[dict]:
    """The row's turns as chat messages, checked for what every template needs."""
    turns = row.get('conversations') if isinstance(row, dict) else None
    if not turns or not isinstance(turns, list):
        raise BadSampleError('no_conversations', 'row has no conversations (a list of turns), '
                             f'got {_describe(turns)}')
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSampleError('bad_turn', f'turn {position} must be an object with "from" and '
                                 f'"value", got {_describe(turn)}')
        name = turn.get('from')
        role = ROLES.get(name) if isinstance(name, str) else None
        if role is None:
            raise BadSampleError('unknown_role', f'unknown role {name!r} (use human/gpt/system)')
        content = turn.get('value')
        if content is not None and not isinstance(content, str):
            raise BadSampleError('bad_turn', f'turn {position}: value must be a string, got '
                                 f'{_describe(content)}')
        if content is None:
            raise BadSampleError('empty_text', f'{role} turn has no text value')
        _check_text(content, f'turn {position}')
        if role == 'assistant' and not content.strip():
            raise BadSampleError('empty_text', 'empty gpt turn (caption or answer)')
        messages.append(dict(role=role, content=content))
    if not any(m['role'] == 'assistant' for m in messages):
        raise BadSampleError('empty_text', 'row has no gpt turn to learn from')
    if messages[-1]['role'] == 'user':
        # Truncated data, or turns in the wrong order: the question is unanswered.
        raise BadSampleError('ends_with_user_turn', 'the last turn is a human turn with no gpt '
                             'answer after it; end the conversation with a gpt turn')
    return messages


def duplicate_ids(rows) -> List[dict]:
    """Records for every row whose ``id`` an earlier row already has.

    Args:
        rows: (file, row index, row) triples, in reading order.
    """
    first_seen, problems = {}, []
    for source, index, row in rows:
        row_id = row.get('id') if isinstance(row, dict) else None
        if row_id is None or isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
            continue  # reported as bad_id by the schema check
        if row_id in first_seen:
            where = first_seen[row_id]
            err = BadSampleError('duplicate_id', f'id {row_id!r} is also at {where[0]} row '
                                 f'{where[1]}')
            problems.append(bad_row_record(source, index, row, err))
        else:
            first_seen[row_id] = (source, index)
    return problems


def check_image_tags(image: Optional[str], messages: List[dict]) -> None:
    """One ``<image>`` tag for a row with an image, none without."""
    tags = sum(m['content'].count(IMAGE_TOKEN) for m in messages)
    if image is not None and tags != 1:
        raise BadSampleError('image_tag_mismatch',
                             f'row has an image but {tags} {IMAGE_TOKEN} tags (needs 1)')
    if image is None and tags:
        raise BadSampleError('image_tag_mismatch', f'row has {IMAGE_TOKEN} tags but no image')


# Past this many pixels, as the image processor would receive them (after
# pad_to_square), an image is first down-scaled: a 10000 x 50 strip would
# otherwise be padded to 10^8 pixels. 4096^2 leaves every common dataset
# image untouched. None: no cap (the reference implementation).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, with the values of modes PIL's ``convert`` would clip.

    ``convert('RGB')`` clips 16-bit and 32-bit integer grey to 255 (a 16-bit
    PNG becomes all white); those are rescaled from their 16-bit range. Modes
    with transparency keep their colour channels (as LLaVA's ``convert('RGB')``)
    without PIL's palette warning.
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == 'I':
        values = np.asarray(image).astype(np.int64)
        # 32-bit 'I' images of 8-bit data (max <= 255) are kept as they are.
        if image.mode in SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(values.astype(np.uint8), 'L').convert('RGB')
    if image.mode == 'F':
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if values.max(initial=0) <= 1.0:  # floating-point images are usually 0..1
            values = values * 255
        values = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(values, 'L').convert('RGB')
    if image.mode == 'P' and 'transparency' in image.info:
        image = image.convert('RGBA')
    return image.convert('RGB')


def open_image(path: str, max_pixels: Optional[int] = None, square: bool = False) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, fully decoded (so truncation shows here).

    Args:
        path: the image file.
        max_pixels: down-scale (aspect ratio kept) images with more pixels than
            this (counted after padding to a square when ``square``); None: never.
        square: the image will be padded to a square.

    Raises:
        BadSampleError: ``missing_image``, ``zero_size_image``, ``too_large_image``
            (over PIL's decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``) or
            ``unreadable_image``.
    """
    if not osp.isfile(path):
        raise BadSampleError('missing_image', f'{path} does not exist')
    if osp.getsize(path) == 0:
        raise BadSampleError('zero_size_image', f'{path} is empty')
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; the limit
            # below turns both into a reported row.
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and width * height > limit:
                    raise Image.DecompressionBombError(
                        f'{width} x {height} pixels, over PIL\'s decompression-bomb limit '
                        f'Image.MAX_IMAGE_PIXELS={limit}')
                scale = _downscale(width, height, max_pixels, square)
                if scale < 1 and image.format == 'JPEG':
                    # The decoder itself reduces by up to 8x: cheaper than a full decode.
                    image.draft('RGB', (int(width * scale) + 1, int(height * scale) + 1))
                image.load()
                rgb = to_rgb(image)
    except Image.DecompressionBombError as err:
        if 'MAX_IMAGE_PIXELS' not in str(err):
            err = f"{err} (PIL's Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})"
        raise BadSampleError('too_large_image', f'{path}: {err}') from None
    except Exception as err:  # noqa: BLE001 - any decoder failure on an untrusted file
        raise BadSampleError('unreadable_image',
                             f'{path}: {type(err).__name__}: {err}') from None
    scale = _downscale(rgb.width, rgb.height, max_pixels, square)
    if scale < 1:
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.BICUBIC, reducing_gap=3.0)
    return rgb


def _downscale(width: int, height: int, max_pixels: Optional[int], square: bool) -> float:
    """The factor that brings an image within ``max_pixels`` (1: none needed)."""
    pixels = max(width, height) ** 2 if square else width * height
    if max_pixels is None or pixels <= max_pixels:
        return 1.0
    return math.sqrt(max_pixels / pixels)


@DATASETS.register_module()
class LLaVADataset(BaseDataset):
    """Tokenised LLaVA rows for one DPA stage.

    Args:
        data_files: json/jsonl files, read in order.
        image_folder: directory the rows' ``image`` paths are relative to.
        tokenizer: config of the tokenizer.
        template: ``'caption_text'`` (stage 1: the caption alone, no image),
            ``'plain'`` (stage 2: image then caption, prompt dropped, as in
            LLaVA pretraining) or ``'chat'`` (stage 3: the tokenizer's chat
            template, labels on assistant contents and their end-of-turn token).
        image_processor: config of the HF image processor.
        num_image_tokens: how many ``<image>`` ids stand for one image.
        max_length: longest sample; text is truncated from the end, image
            tokens never.
        pad_to_square: pad images to a square with the processor's mean colour
            before processing (LLaVA-1.5's ``image_aspect_ratio='pad'``).
        max_image_pixels: images with more pixels than this (after padding to
            a square) are first down-scaled, aspect ratio kept; None: never
            (the reference implementation). Images over PIL's
            ``Image.MAX_IMAGE_PIXELS`` are bad rows (``too_large_image``).
        caption_suffix: how a caption ends in the ``caption_text`` and
            ``plain`` templates: ``'eos'``, the stripped caption then the
            tokenizer's EOS token; ``'\n'``, the caption as written then a
            newline, tokenized together (the reference's LLaVA ``plain``
            template). See docs/fidelity.md.
        labels: what the ``chat`` template labels: ``'assistant'``, the
            tokenizer's own chat template with the assistant contents and
            their end-of-turn token labelled; ``'reference'``, fnlp-vision/DPA's
            conversation templates, system prompts and label masking
            (:mod:`dpa.datasets.reference_chat`; Qwen, Llama-3 and Gemma).
        anyres: LLaVA-NeXT's dynamic resolution, the arguments of
            :class:`dpa.models.anyres.AnyRes` (``anyres_settings`` makes them
            from a config): an image becomes its tiles (``pixel_values`` of
            shape (tiles, C, H, W)) and its ``image_size``, and a number of
            ``<image>`` ids that depends on its size (``num_image_tokens`` is
            then unused). None: one fixed-size image.

    A bad row never stops training: ``dataset[i]`` replaces it by the next good
    row (deterministically) and lists what it skipped under the sample's
    ``skipped`` key; invalid jsonl lines are listed in ``load_problems``. A
    row whose ``id`` an earlier row has is bad (``duplicate_id``); a dataset
    whose every row is bad raises :class:`AllRowsBad`.
    ``prepare_data(i)`` raises :class:`BadSampleError` instead.
    """

    def __init__(self,
                 data_files: Union[str, Sequence[str]],
                 tokenizer: dict,
                 template: str = 'chat',
                 image_folder: str = '',
                 image_processor: Optional[dict] = None,
                 num_image_tokens: int = 0,
                 max_length: int = 2048,
                 pad_to_square: bool = False,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 caption_suffix: str = 'eos',
                 labels: str = 'assistant',
                 anyres: Optional[dict] = None,
                 **kwargs):
        if template not in TEMPLATES:
            raise ValueError(f'dataset template must be one of {TEMPLATES}, got {template!r}')
        if caption_suffix not in CAPTION_SUFFIXES:
            raise ValueError(f'caption_suffix must be one of {CAPTION_SUFFIXES}, got '
                             f'{caption_suffix!r}')
        if labels not in LABEL_MODES:
            raise ValueError(f'labels must be one of {LABEL_MODES}, got {labels!r}')
        self.caption_suffix, self.labels = caption_suffix, labels
        self.data_files = [data_files] if isinstance(data_files, str) else list(data_files)
        self.template = template
        self.image_folder = image_folder
        self.tokenizer = PROCESSORS.build(tokenizer)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.reference_family = (reference_family(self.tokenizer)
                                 if template == 'chat' and labels == 'reference' else None)
        uses_images = template != 'caption_text'
        self.image_processor = PROCESSORS.build(image_processor) if uses_images else None
        self.anyres = AnyRes(**anyres) if anyres is not None and uses_images else None
        if self.anyres is not None:
            if pad_to_square:
                raise ValueError('anyres resizes and pads images to its grid itself: set '
                                 'pad_to_square=False')
            self.image_processor = self.anyres.image_processor(self.image_processor)
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        self.max_image_pixels = max_image_pixels
        if uses_images and self.anyres is None and num_image_tokens <= 0:
            raise ValueError('num_image_tokens must be positive for an image template')
        super().__init__(**kwargs)

    def load_data_list(self) -> List[dict]:
        self.load_problems = []
        data = []
        for path in self.data_files:
            for row_index, row in read_rows(path, self.load_problems):
                data.append(dict(row=row, source=path, row_index=row_index))
        # A repeated id is a repeated row (or a mislabelled one): trained once,
        # the later ones skipped and listed, as check_data reports them.
        self.duplicates = {(d['file'], d['row']): d['detail'] for d in duplicate_ids(
            (info['source'], info['row_index'], info['row']) for info in data)}
        return data

    def __getitem__(self, idx: int) -> dict:
        if not self._fully_initialized:
            self.full_init()
        skipped = []
        for offset in range(len(self)):
            index = (idx + offset) % len(self)
            try:
                sample = self.prepare_data(index)
            except BadSampleError as err:
                info = self.get_data_info(index)
                skipped.append(bad_row_record(info['source'], info['row_index'], info['row'], err))
                continue
            if skipped:
                sample['skipped'] = skipped
            return sample
        reasons = Counter(record['reason'] for record in skipped)
        raise AllRowsBad(
            f'every row of {self.data_files} is bad ('
            + ', '.join(f'{count} x {reason}' for reason, count in reasons.most_common())
            + f'), e.g. {skipped[0]["file"]} row {skipped[0]["row"]}: {skipped[0]["detail"]}. '
            'Fix the data: tools/check_data.py lists every problem')

    def prepare_data(self, idx: int) -> dict:
        info = self.get_data_info(idx)
        # The row's own problem first, the one check_data names beside duplicate_id.
        sample = self.tokenize(info['row'])
        duplicate = self.duplicates.get((info['source'], info['row_index']))
        if duplicate is not None:
            raise BadSampleError('duplicate_id', duplicate)
        return sample

    def image_tokens(self, idx: int) -> int:
        """How many ``<image>`` ids row ``idx``'s image becomes (0 without one),
        without tokenising the row; AnyRes reads the image's size from its file
        header. For length estimates (the length-grouped sampler): a row whose
        image cannot be read counts the fewest tokens an image can have."""
        row = self.get_data_info(idx)['row']
        image = row.get('image') if isinstance(row, dict) else None
        if not isinstance(image, str) or self.template == 'caption_text':
            return 0
        if self.anyres is None:
            return self.num_image_tokens
        try:
            with Image.open(osp.join(self.image_folder, image)) as opened:
                width, height = opened.size
        except Exception:  # noqa: BLE001 - the row is reported when it is read
            return self.anyres.side ** 2
        scale = _downscale(width, height, self.max_image_pixels, square=False)
        return self.anyres.num_tokens((max(1, round(height * scale)),
                                       max(1, round(width * scale))))

    def tokenize(self, row: dict) -> dict:
        """The training sample of one row; raises :class:`BadSampleError`."""
        messages, image = validate_row(row)
        if self.template == 'chat':
            ids, labels = self._chat_tokens(messages)
        else:
            caption = next(m['content'] for m in messages if m['role'] == 'assistant')
            ids, labels = self._caption_tokens(caption)

        pixel_values = image_size = None
        if self.template != 'caption_text':
            if self.template == 'plain' and image is None:
                raise BadSampleError('image_tag_mismatch', 'an image-caption row has no image')
            if self.template == 'chat':
                check_image_tags(image, messages)
            if image is not None:
                pixel_values = self._load_image(image)
                count = self.num_image_tokens
                if self.anyres is not None:
                    tiles = pixel_values
                    pixel_values, image_size = tiles['pixel_values'], tiles['image_size']
                    count = self.anyres.num_tokens(image_size.tolist())
                ids, labels = self._expand_image(ids, labels, count)
        ids, labels = self._truncate(ids, labels)
        sample = dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                      pixel_values=pixel_values)
        if image_size is not None:
            sample['image_size'] = image_size
        return sample

    def _caption_tokens(self, caption: str):
        tok = self.tokenizer
        if self.caption_suffix == 'eos':
            text = tok(caption.strip(), add_special_tokens=False).input_ids + [tok.eos_token_id]
        else:  # the reference tokenizes the caption and its separator as one string
            text = tok(caption + self.caption_suffix, add_special_tokens=False).input_ids
        prefix = [] if tok.bos_token_id is None else [tok.bos_token_id]
        if self.template == 'plain':
            prefix = prefix + [self.image_token_id]
        return prefix + text, [IGNORE_INDEX] * len(prefix) + text

    def _chat_tokens(self, messages: List[dict]):
        if self.reference_family is not None:
            try:
                return reference_chat_tokens(self.tokenizer, messages, self.reference_family)
            except ReferenceFormatError as err:
                raise BadSampleError('template_mismatch', str(err)) from None
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        except TemplateError as err:
            # e.g. Gemma-2's template raises on a system turn.
            raise BadSampleError('template_mismatch',
                                 f"the tokenizer's chat template rejected the row: {err}") from err
        spans, cursor = [], 0
        for message in messages:
            content = message['content'].strip()
            start = text.find(content, cursor)
            if start < 0:
                raise BadSampleError('template_mismatch', f'the chat template changed a '
                                     f'{message["role"]} turn beyond recognition; cannot '
                                     'place its labels')
            cursor = start + len(content)
            if message['role'] == 'assistant':
                spans.append((start, cursor))

        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding.input_ids, encoding.offset_mapping
        special = set(self.tokenizer.all_special_ids)
        labels = [IGNORE_INDEX] * len(ids)
        for span_start, span_end in spans:
            after = None
            for i, (start, end) in enumerate(offsets):
                if start < span_end and end > span_start:
                    labels[i] = ids[i]
                elif start >= span_end and after is None:
                    after = i
            # The end-of-turn token right after the answer is learnt too.
            if after is not None and ids[after] in special:
                labels[after] = ids[after]
        return ids, labels

    def _expand_image(self, ids, labels, n: int):
        at = ids.index(self.image_token_id)
        return (ids[:at] + [self.image_token_id] * n + ids[at + 1:],
                labels[:at] + [IGNORE_INDEX] * n + labels[at + 1:])

    def _truncate(self, ids, labels):
        image_positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if image_positions and image_positions[-1] >= self.max_length:
            raise BadSampleError('too_long', f'the image tokens end at position '
                                 f'{image_positions[-1] + 1}, beyond max_length={self.max_length}')
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise BadSampleError('too_long', 'no supervised token left within '
                                 f'max_length={self.max_length}')
        return ids, labels

    def _load_image(self, relative_path: str):
        image = open_image(osp.join(self.image_folder, relative_path), self.max_image_pixels,
                           square=self.pad_to_square)
        if self.anyres is not None:
            return self.anyres.preprocess(image, self.image_processor)
        return preprocess_image(image, self.image_processor, self.pad_to_square)


@FUNCTIONS.register_module()
def dpa_collate(samples: List[dict]) -> dict:
    """Right-pad a list of samples into a batch. Padded ids are masked out by
    ``attention_mask`` and ignored by the loss, so their value does not matter."""
    lengths = [len(s['input_ids']) for s in samples]
    batch, length = len(samples), max(lengths)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row, (sample, n) in enumerate(zip(samples, lengths)):
        input_ids[row, :n] = sample['input_ids']
        labels[row, :n] = sample['labels']
        attention_mask[row, :n] = 1
    images = [s['pixel_values'] for s in samples if s['pixel_values'] is not None]
    # AnyRes images: a varying number of tiles each, concatenated, and their sizes.
    sizes = [s['image_size'] for s in samples if s.get('image_size') is not None]
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                 pixel_values=(torch.cat if sizes else torch.stack)(images) if images else None)
    if sizes:
        batch['image_sizes'] = torch.stack(sizes)
    skipped = [record for s in samples for record in s.get('skipped', [])]
    if skipped:
        # Taken out by DPAHook before the batch reaches the model.
        batch['skipped'] = skipped
    return batch
