"""LLaVA-format datasets: json or jsonl rows with an optional ``image`` (relative
to an image folder) and ``conversations`` of human/gpt turns."""
import json
import os
from typing import List, Optional, Sequence, Union

import torch
from mmengine.dataset import BaseDataset
from PIL import Image

from dpa.models.builders import IMAGE_TOKEN, PROCESSORS
from dpa.models.losses import IGNORE_INDEX
from dpa.registry import DATASETS, FUNCTIONS

TEMPLATES = ('caption_text', 'plain', 'chat')
ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
         'system': 'system'}


class BadSampleError(ValueError):
    """A data row that cannot become a training sample; the message says why."""


def read_rows(path: str) -> List[dict]:
    """Rows of a LLaVA json (a list) or jsonl (one object a line) file."""
    with open(path, encoding='utf-8') as f:
        if path.endswith('.jsonl'):
            return [json.loads(line) for line in f if line.strip()]
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f'{path}: a LLaVA json file holds a list of rows')
    return rows


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
                 **kwargs):
        if template not in TEMPLATES:
            raise ValueError(f'dataset template must be one of {TEMPLATES}, got {template!r}')
        self.data_files = [data_files] if isinstance(data_files, str) else list(data_files)
        self.template = template
        self.image_folder = image_folder
        self.tokenizer = PROCESSORS.build(tokenizer)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        uses_images = template != 'caption_text'
        self.image_processor = PROCESSORS.build(image_processor) if uses_images else None
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        if uses_images and num_image_tokens <= 0:
            raise ValueError('num_image_tokens must be positive for an image template')
        super().__init__(**kwargs)

    def load_data_list(self) -> List[dict]:
        data = []
        for path in self.data_files:
            for row_index, row in enumerate(read_rows(path)):
                data.append(dict(row=row, source=path, row_index=row_index))
        return data

    def prepare_data(self, idx: int) -> dict:
        info = self.get_data_info(idx)
        try:
            return self.tokenize(info['row'])
        except BadSampleError as err:
            # Bad rows must not pass silently; skipping them is a later issue.
            raise BadSampleError(f"{info['source']} row {info['row_index']} "
                                 f"(id {info['row'].get('id')!r}): {err}") from None

    def tokenize(self, row: dict) -> dict:
        turns = row.get('conversations')
        if not turns:
            raise BadSampleError('row has no conversations')
        if self.template == 'chat':
            ids, labels = self._chat_tokens(turns)
        else:
            answers = [t['value'] for t in turns if ROLES.get(t.get('from')) == 'assistant']
            if not answers or not answers[0].strip():
                raise BadSampleError('row has no caption (first gpt turn)')
            ids, labels = self._caption_tokens(answers[0].strip())

        pixel_values = None
        if self.template != 'caption_text':
            n_tags = ids.count(self.image_token_id)
            if 'image' in row and n_tags != 1:
                raise BadSampleError(f'row has an image but {n_tags} {IMAGE_TOKEN} tags (needs 1)')
            if 'image' not in row and n_tags:
                raise BadSampleError(f'row has {IMAGE_TOKEN} tags but no image')
            if 'image' in row:
                pixel_values = self._load_image(row['image'])
                ids, labels = self._expand_image(ids, labels)
        ids, labels = self._truncate(ids, labels)
        return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                    pixel_values=pixel_values)

    def _caption_tokens(self, caption: str):
        tok = self.tokenizer
        text = tok(caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
        prefix = [] if tok.bos_token_id is None else [tok.bos_token_id]
        if self.template == 'plain':
            prefix = prefix + [self.image_token_id]
        return prefix + text, [IGNORE_INDEX] * len(prefix) + text

    def _chat_tokens(self, turns: List[dict]):
        messages = []
        for turn in turns:
            role = ROLES.get(turn.get('from'))
            if role is None:
                raise BadSampleError(f"unknown role {turn.get('from')!r} (use human/gpt/system)")
            messages.append(dict(role=role, content=turn.get('value') or ''))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        spans, cursor = [], 0
        for message in messages:
            content = message['content'].strip()
            start = text.find(content, cursor)
            if start < 0:
                raise BadSampleError(f'the chat template changed a {message["role"]} turn '
                                     'beyond recognition; cannot place its labels')
            cursor = start + len(content)
            if message['role'] == 'assistant':
                if not content:
                    raise BadSampleError('empty answer')
                spans.append((start, cursor))
        if not spans:
            raise BadSampleError('row has no gpt turn to learn from')

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

    def _expand_image(self, ids, labels):
        at = ids.index(self.image_token_id)
        n = self.num_image_tokens
        return (ids[:at] + [self.image_token_id] * n + ids[at + 1:],
                labels[:at] + [IGNORE_INDEX] * n + labels[at + 1:])

    def _truncate(self, ids, labels):
        image_positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if image_positions and image_positions[-1] >= self.max_length:
            raise BadSampleError(f'the image tokens end at position {image_positions[-1] + 1}, '
                                 f'beyond max_length={self.max_length}')
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise BadSampleError(f'no supervised token left within max_length={self.max_length}')
        return ids, labels

    def _load_image(self, relative_path: str) -> torch.Tensor:
        path = os.path.join(self.image_folder, relative_path)
        try:
            with Image.open(path) as image:
                image = image.convert('RGB')
        except (OSError, ValueError) as err:
            raise BadSampleError(f'cannot read image {path}: {err}') from None
        if self.pad_to_square:
            image = expand_to_square(image, self.image_processor.image_mean)
        return self.image_processor(images=image, return_tensors='pt').pixel_values[0]


def expand_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """Pad to a square, centred, with the mean colour (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), tuple(int(c * 255) for c in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


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
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                pixel_values=torch.stack(images) if images else None)
