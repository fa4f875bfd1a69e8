"""Which vocabulary entries are content words, for statistics split by token
class (CMO should weigh content, not template or punctuation).

The rule: a token is *content* when its vocabulary entry holds a letter or a
digit (after removing the tokenizer's word-boundary markers) and it is not a
special token. Everything else (chat-template specials, whitespace,
punctuation, byte fragments without letters) is *template*."""
import torch

# Word-boundary markers of byte-level BPE ('Ġ', 'Ċ') and SentencePiece ('▁').
_MARKERS = str.maketrans('', '', '\u0120\u010a\u2581')


def content_token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool, True for content tokens (ids beyond the
    tokenizer's vocabulary count as template)."""
    special = set(tokenizer.all_special_ids)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = range(min(len(tokenizer), vocab_size))
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        if token_id in special or token is None:
            continue
        mask[token_id] = any(c.isalnum() for c in token.translate(_MARKERS))
    return mask
