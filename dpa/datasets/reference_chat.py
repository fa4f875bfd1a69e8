"""Stage-3 tokens and labels exactly as fnlp-vision/DPA builds them
(``llava/train/train_dpa.py``: ``preprocess_multimodal`` then
``preprocess_qwen`` / ``preprocess_llama3`` / ``preprocess_gemma``), for the
dataset's ``labels='reference'``.

The reference does not use the tokenizer's chat template. Per family it
renders its own conversation template with a fixed system prompt, tokenizes
each turn on its own and concatenates the pieces, and labels:

- Qwen (``--version qwen_1_5``, ChatML): every assistant turn whole, role
  header and closing ``<|im_end|>\\n`` included, plus, in every turn, each
  ``<|im_start|>``, ``<|im_end|>`` and ``\\n`` token (its hard-coded ids 198,
  151644, 151645).
- Llama-3 (``--version llama_v3``): every assistant turn whole, header
  included, plus ``<|begin_of_text|>``, ``<|start_header_id|>``,
  ``<|end_header_id|>`` and ``<|eot_id|>`` everywhere. Its list also names
  ``"\\n\\n"``, but ``convert_tokens_to_ids("\\n\\n")`` finds no such token in
  Llama-3's byte-level vocabulary (the token is spelled ``"ĊĊ"``) and returns
  the unknown id, None: the blank line after each header stays unlabelled.
- Gemma (``--version gemma``): each answer and the ``<end_of_turn>\\n`` after
  it; no system prompt.

InternLM2 and other families have no preprocessing function there (the
reference does not support them).
"""
from typing import List, Tuple

from dpa.models.builders import IMAGE_TOKEN
from dpa.models.losses import IGNORE_INDEX

# llava/train/train_dpa.py, the system_message defaults of preprocess_qwen and
# preprocess_llama3.
QWEN_SYSTEM = 'You are a helpful assistant.'
LLAMA3_SYSTEM = ('Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n'
                 'You are a helpful language and vision assistant. You are able to understand '
                 'the visual content that the user provides, and assist the user with a variety '
                 'of tasks using natural language.')
REFERENCE_FAMILIES = ('qwen', 'llama3', 'gemma')


class ReferenceFormatError(ValueError):
    """A row or tokenizer the reference's stage-3 preprocessing cannot take."""


def reference_family(tokenizer) -> str:
    """Which of the reference's stage-3 formats fits ``tokenizer``, from its
    special tokens: ``'llama3'``, ``'gemma'`` or ``'qwen'`` (ChatML without a
    BOS, which also covers the tiny default's tokenizer).

    Raises:
        ValueError: a tokenizer of a family the reference does not support.
    """
    vocab = tokenizer.get_vocab()
    if '<|start_header_id|>' in vocab and '<|eot_id|>' in vocab:
        return 'llama3'
    if '<start_of_turn>' in vocab and '<end_of_turn>' in vocab:
        return 'gemma'
    if '<|im_start|>' in vocab and '<|im_end|>' in vocab and tokenizer.bos_token is None:
        return 'qwen'
    raise ValueError(
        "finetune.labels='reference' reproduces fnlp-vision/DPA's stage-3 preprocessing, which "
        'exists for Qwen (ChatML without BOS), Llama-3 and Gemma only; this tokenizer '
        f'(bos={tokenizer.bos_token!r}, eos={tokenizer.eos_token!r}) is none of them '
        "(InternLM2's ChatML starts with <s>): use finetune.labels='assistant'")


def move_image_tag_first(content: str) -> str:
    """``preprocess_multimodal``: a turn with one ``<image>`` not at its start
    becomes ``'<image>\\n'`` + the rest, stripped."""
    if content.count(IMAGE_TOKEN) == 1 and not content.startswith(IMAGE_TOKEN):
        content = IMAGE_TOKEN + '\n' + content.replace(IMAGE_TOKEN, '').strip()
        content = content.strip()
    return content


def reference_chat_tokens(tokenizer, messages: List[dict],
                          family: str) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)`` of one conversation as the reference builds them.

    Args:
        tokenizer: the stage's tokenizer (``<image>`` is one special token).
        messages: the row's turns as ``{'role', 'content'}`` messages.
        family: one of :data:`REFERENCE_FAMILIES` (see :func:`reference_family`).

    Raises:
        ReferenceFormatError: a turn the reference's template cannot take
            (Gemma: a system turn).
    """
    messages = [dict(m, content=move_image_tag_first(m['content'])) for m in messages]
    # "Skip the first one if it is not from human".
    if messages and messages[0]['role'] != 'user':
        messages = messages[1:]
    if family == 'gemma':
        return _gemma_tokens(tokenizer, messages)

    def encode(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    if family == 'qwen':
        specials = ['<|im_start|>', '<|im_end|>']
        newline = encode('\n')
        unmask = {tokenizer.convert_tokens_to_ids(t) for t in specials} | set(newline[:1])
        pieces = [('system', QWEN_SYSTEM)] + [(m['role'], m['content']) for m in messages]
        texts = [f'<|im_start|>{role}\n{content}<|im_end|>\n' for role, content in pieces]
    elif family == 'llama3':
        specials = ['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']
        unmask = {tokenizer.convert_tokens_to_ids(t) for t in specials}
        pieces = [('system', LLAMA3_SYSTEM)] + [(m['role'], m['content']) for m in messages]
        # The template trims each content; only the system piece keeps its BOS.
        texts = [f'<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>'
                 for role, content in pieces]
        texts[0] = tokenizer.bos_token + texts[0]
    else:
        raise ValueError(f'unknown reference family {family!r}; choose among '
                         f'{REFERENCE_FAMILIES}')

    ids, labels = [], []
    for (role, _), text in zip(pieces, texts):
        piece = encode(text)
        ids += piece
        labels += piece if role == 'assistant' else [IGNORE_INDEX] * len(piece)
    labels = [token if token in unmask else label for token, label in zip(ids, labels)]
    return ids, labels


def _gemma_tokens(tokenizer, messages: List[dict]) -> Tuple[List[int], List[int]]:
    """``conv_gemma_instruct``: ``<bos>`` then ``<start_of_turn>user\\n{q}<end_of_turn>\\n
    <start_of_turn>model\\n{a}<end_of_turn>\\n`` per round; the answer and its
    ``<end_of_turn>\\n`` are labelled."""
    roles = {'user': '<start_of_turn>user\n', 'assistant': '<start_of_turn>model\n'}
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    prompt = ''
    for position, message in enumerate(messages):
        expected = 'user' if position % 2 == 0 else 'assistant'
        if message['role'] != expected:
            raise ReferenceFormatError(
                f"the reference's Gemma template needs alternating user/assistant turns; turn "
                f"{position} is {message['role']!r}")
        if expected == 'user':
            prompt += roles['user'] + message['content'] + '<end_of_turn>\n' + roles['assistant']
            continue
        for text, learnt in ((prompt, False), (message['content'] + '<end_of_turn>\n', True)):
            piece = tokenizer(text, add_special_tokens=False).input_ids
            ids += piece
            labels += piece if learnt else [IGNORE_INDEX] * len(piece)
        prompt = ''
    if prompt:  # a last question without an answer is kept, unlabelled
        piece = tokenizer(prompt[:-len(roles['assistant'])], add_special_tokens=False).input_ids
        ids, labels = ids + piece, labels + [IGNORE_INDEX] * len(piece)
    return ids, labels
