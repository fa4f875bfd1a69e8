"""Word-level ChatML tokenizer for the tiny default, built locally (no hub).

Whole words of the synthetic data vocabulary are single tokens; any other
ASCII text falls back to one token per character, so nothing ASCII is ever
``<unk>``. Decoding concatenates pieces, so ``decode(encode(t)) == t``.

With a ``family`` it carries that family's special tokens and real chat
template instead (:mod:`dpa.models.chat_templates`): the tokenizer of a random
tiny stand-in of a Qwen2.5, Llama-3.1, Gemma-2 or InternLM2 checkpoint.
"""
import string
from typing import Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpa.synthetic_text import VOCABULARY
from dpa.models.chat_templates import chat_family, load_chat_template

TINY_VOCAB_SIZE = 512
PAD_TOKEN = '<|endoftext|>'
IM_START = '<|im_start|>'
IM_END = '<|im_end|>'
IMAGE_TOKEN = '<image>'
UNK_TOKEN = '<unk>'
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN, UNK_TOKEN)
# Role names follow <|im_start|> in every rendered chat turn.
CHAT_ROLES = ('system', 'user', 'assistant')

# Qwen2's ChatML template, minus its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _pre_tokenizer(words):
    # Known words (not inside a longer letter run) become one piece; every
    # other character is its own piece, which the vocabulary covers for ASCII.
    longest_first = sorted(words, key=lambda w: (-len(w), w))
    pattern = '(?<![A-Za-z])(?:' + '|'.join(longest_first) + ')(?![A-Za-z])|[\\s\\S]'
    return pre_tokenizers.Split(Regex(pattern), behavior='isolated')


def build_tiny_tokenizer(family: Optional[str] = None) -> PreTrainedTokenizerFast:
    """Args:
        family: None for the ChatML default, or a chat family of
            :mod:`dpa.models.chat_templates` (``'qwen2_5'``, ``'llama3_1'``,
            ``'gemma2'``, ``'internlm2'``).
    """
    if family is None:
        specials, roles, template = SPECIAL_TOKENS, CHAT_ROLES, CHAT_TEMPLATE
        tokens = dict(pad_token=PAD_TOKEN, eos_token=IM_END,
                      extra_special_tokens=[IM_START, IMAGE_TOKEN])
    else:
        chat = chat_family(family)
        specials, roles = (*chat.special_tokens, IMAGE_TOKEN, UNK_TOKEN), chat.roles
        template = load_chat_template(family)
        named = (chat.bos, chat.eos, chat.pad)
        tokens = dict(bos_token=chat.bos, eos_token=chat.eos, pad_token=chat.pad,
                      extra_special_tokens=[t for t in chat.special_tokens if t not in named]
                      + [IMAGE_TOKEN])
    vocab = {}
    for token in (*specials, *string.printable, *VOCABULARY, *roles):
        vocab.setdefault(token, len(vocab))
    assert len(vocab) < TINY_VOCAB_SIZE, len(vocab)

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = _pre_tokenizer([w for w in vocab if len(w) > 1 and w.isalpha()])
    tok.decoder = decoders.Fuse()
    # Special added tokens are matched before pre-tokenization, so
    # "<|im_start|>" and "<image>" stay single ids inside any text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK_TOKEN,
        model_max_length=4096,
        chat_template=template,
        clean_up_tokenization_spaces=False,
        **tokens,
    )
