"""Word-level ChatML tokenizer for the tiny default, built locally (no hub).

Whole words of the synthetic data vocabulary are single tokens; any other
ASCII text falls back to one token per character, so nothing ASCII is ever
``<unk>``. Decoding concatenates pieces, so ``decode(encode(t)) == t``.
"""
import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpa.datasets.synthetic import VOCABULARY

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


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {}
    for token in (*SPECIAL_TOKENS, *string.printable, *VOCABULARY, *CHAT_ROLES):
        vocab.setdefault(token, len(vocab))
    assert len(vocab) < TINY_VOCAB_SIZE, len(vocab)

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = _pre_tokenizer([w for w in vocab if len(w) > 1 and w.isalpha()])
    tok.decoder = decoders.Fuse()
    # Special added tokens are matched before pre-tokenization, so
    # "<|im_start|>" and "<image>" stay single ids inside any text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IM_START, IMAGE_TOKEN],
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
