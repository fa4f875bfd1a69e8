"""LLaVA-format datasets: json or jsonl rows with an optional ``image`` (relative
to an image folder) and ``conversations`` of human/gpt turns."""
import json
import os.path as osp
from typing import List, Optional, Sequence, Tuple, Union

import torch
from jinja2 import TemplateError
from mmengine.dataset import BaseDataset
from PIL import Image

from dpa.models.builders import IMAGE_TOKEN, PROCESSORS
from dpa.models.losses import IGNORE_INDEX
from dpa.registry import DATASETS, FUNCTIONS

TEMPLATES = ('caption_text', 'plain', 'chat')
ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
         'system': 'system'}


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
    line) file. Invalid jsonl lines are appended to ``problems`` and skipped;
    without ``problems`` they raise."""
    with open(path, encoding='utf-8') as f:
        if not path.endswith('.jsonl'):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f'{path} is not valid json ({err}); a LLaVA json file holds '
                                 'a list of rows, use .jsonl for one row a line') from None
            if not isinstance(rows, list):
                raise ValueError(f'{path}: a LLaVA json file holds a list of rows')
            return list(enumerate(rows))
        rows = []
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append((index, json.loads(line)))
            except json.JSONDecodeError as err:
                bad = BadSampleError('invalid_json', f'line {index + 1}: {err}')
                if problems is None:
                    raise bad from None
                problems.append(bad_row_record(path, index, None, bad))
        return rows


def conversation_messages(row) -> List[dict]:
    """The row's turns as chat messages, checked for what every template needs."""
    turns = row.get('conversations') if isinstance(row, dict) else None
    if not turns or not isinstance(turns, list):
        raise BadSampleError('no_conversations', 'row has no conversations')
    messages = []
    for turn in turns:
        name = turn.get('from') if isinstance(turn, dict) else turn
        role = ROLES.get(name) if isinstance(name, str) else None
        if role is None:
            raise BadSampleError('unknown_role', f'unknown role {name!r} (use human/gpt/system)')
        content = turn.get('value')
        if not isinstance(content, str):
            raise BadSampleError('empty_text', f'{role} turn has no text value')
        if role == 'assistant' and not content.strip():
            raise BadSampleError('empty_text', 'empty gpt turn (caption or answer)')
        messages.append(dict(role=role, content=content))
    if not any(m['role'] == 'assistant' for m in messages):
        raise BadSampleError('empty_text', 'row has no gpt turn to learn from')
    return messages


def check_image_tags(row: dict, messages: List[dict]) -> None:
    tags = sum(m['content'].count(IMAGE_TOKEN) for m in messages)
    if 'image' in row and tags != 1:
        raise BadSampleError('image_tag_mismatch',
                             f'row has an image but {tags} {IMAGE_TOKEN} tags (needs 1)')
    if 'image' not in row and tags:
        raise BadSampleError('image_tag_mismatch', f'row has {IMAGE_TOKEN} tags but no image')


def open_image(path: str) -> Image.Image:
    """The image at ``path`` as RGB, fully decoded (so truncation shows here)."""
    if not osp.exists(path):
        raise BadSampleError('missing_image', f'{path} does not exist')
    if osp.getsize(path) == 0:
        raise BadSampleError('zero_size_image', f'{path} is empty')
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except (OSError, ValueError, SyntaxError) as err:
        raise BadSampleError('unreadable_image', f'{path}: {err}') from None


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

    A bad row never stops training: ``dataset[i]`` replaces it by the next good
    row (deterministically) and lists what it skipped under the sample's
    ``skipped`` key; invalid jsonl lines are listed in ``load_problems``.
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
        self.load_problems = []
        data = []
        for path in self.data_files:
            for row_index, row in read_rows(path, self.load_problems):
                data.append(dict(row=row, source=path, row_index=row_index))
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
        raise RuntimeError(f'every row of {self.data_files} is bad, e.g. {skipped[:3]}')

    def prepare_data(self, idx: int) -> dict:
        return self.tokenize(self.get_data_info(idx)['row'])

    def tokenize(self, row: dict) -> dict:
        """The training sample of one row; raises :class:`BadSampleError`."""
        messages = conversation_messages(row)
        if self.template == 'chat':
            ids, labels = self._chat_tokens(messages)
        else:
            caption = next(m['content'] for m in messages if m['role'] == 'assistant')
            ids, labels = self._caption_tokens(caption.strip())

        pixel_values = None
        if self.template != 'caption_text':
            if self.template == 'plain' and 'image' not in row:
                raise BadSampleError('image_tag_mismatch', 'an image-caption row has no image')
            if self.template == 'chat':
                check_image_tags(row, messages)
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

    def _chat_tokens(self, messages: List[dict]):
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

    def _expand_image(self, ids, labels):
        at = ids.index(self.image_token_id)
        n = self.num_image_tokens
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

    def _load_image(self, relative_path: str) -> torch.Tensor:
        image = open_image(osp.join(self.image_folder, relative_path))
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
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                 pixel_values=torch.stack(images) if images else None)
    skipped = [record for s in samples for record in s.get('skipped', [])]
    if skipped:
        # Taken out by DPAHook before the batch reaches the model.
        batch['skipped'] = skipped
    return batch
