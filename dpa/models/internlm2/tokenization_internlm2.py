"""InternLM2's tokenizer under transformers 5, built from the checkpoint's
SentencePiece ``tokenizer.model``.

transformers 5 has no InternLM2 tokenizer: ``AutoTokenizer`` either runs the
checkpoint's own ``tokenization_internlm2*.py`` (written for 4.x; it needs
``trust_remote_code``) or, for ``model_type='internlm2'``, converts whatever
files it finds to a generic ``TokenizersBackend``. This class builds the
``tokenizers`` backend from the SentencePiece model itself
(:func:`sentencepiece_backend`), with the published tokenizer's special tokens
and BOS handling, so the ids are SentencePiece's own (checked by
tests/test_internlm2.py against ``sentencepiece.SentencePieceProcessor``), and it
is a fast tokenizer (offsets, which stage-3 labelling needs).
"""
import json
import os.path as osp

from transformers import TokenizersBackend

TOKENIZER_MODEL = 'tokenizer.model'
TOKENIZER_JSON = 'tokenizer.json'
# What the published tokenizer_config.json declares (slow and fast names).
PUBLISHED_CLASS_NAMES = ('InternLM2Tokenizer', 'InternLM2TokenizerFast')


def sentencepiece_backend(model_file: str):
    """A ``tokenizers.Tokenizer`` that encodes like the SentencePiece model in
    ``model_file``: its pieces and ids, BPE merges ranked by piece score,
    byte fallback, user-defined pieces kept whole, and its normalizer settings
    (dummy prefix, whitespace escaping)."""
    try:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
        model_pb2 = import_protobuf()
    except ImportError as err:
        raise ImportError('the InternLM2 tokenizer reads tokenizer.model with `sentencepiece` and '
                          '`protobuf`: pip install "dpa[internlm2]" (or sentencepiece protobuf)'
                          ) from err
    with open(model_file, 'rb') as f:
        proto = model_pb2.ModelProto.FromString(f.read())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ValueError(f'{model_file}: InternLM2 tokenizers are SentencePiece BPE models, this '
                         'one is not')
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)


class InternLM2Tokenizer(TokenizersBackend):
    """InternLM2's tokenizer: ``<s>`` added in front by default
    (``add_bos_token``, as published), ``</s>`` ends a sequence and pads.

    Loads a directory with ``tokenizer.model`` (a published checkpoint) or
    with the ``tokenizer.json`` this class saves beside it.

    Args:
        unk_token / bos_token / eos_token / pad_token: as published
            (``pad_token`` is ``</s>`` in internlm2-chat's tokenizer_config.json).
        add_bos_token / add_eos_token: what ``tokenizer(text)`` adds around
            the text (``add_special_tokens=False`` adds nothing; chat
            templates write ``<s>`` themselves).
    """
    vocab_files_names = {'vocab_file': TOKENIZER_MODEL, 'tokenizer_file': TOKENIZER_JSON}
    model_input_names = ['input_ids', 'attention_mask']

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        tokenizer_file = kwargs.get('tokenizer_file')
        if tokenizer_file is not None and osp.isfile(tokenizer_file):
            return kwargs
        kwargs.pop('tokenizer_file', None)
        vocab_file = kwargs.get('vocab_file')
        if vocab_file is None or not osp.isfile(vocab_file):
            raise ValueError(f'InternLM2Tokenizer needs {TOKENIZER_MODEL} (SentencePiece) or '
                             f'{TOKENIZER_JSON} in the tokenizer directory; found neither')
        kwargs['tokenizer_object'] = sentencepiece_backend(vocab_file)
        return kwargs

    def __init__(self, *args, unk_token='<unk>', bos_token='<s>', eos_token='</s>',
                 pad_token='</s>', add_bos_token=True, add_eos_token=False, **kwargs):
        # A published tokenizer_config.json names the checkpoint's own
        # tokenization_internlm2*.py; a saved copy ships no such files, and
        # AutoTokenizer would look for them (OSError with trust_remote_code,
        # a refusal without).
        kwargs.pop('auto_map', None)
        super().__init__(*args, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, **kwargs)
        self.update_post_processor()

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        # SentencePiece gives every stretch of text between added tokens its
        # own dummy prefix; decode each stretch on its own, as SentencePiece
        # (and the published tokenizer) does, so that prefix is removed.
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        added = self.added_tokens_decoder
        special = set(self.all_special_ids)
        parts, stretch = [], []
        for token_id in list(token_ids) + [None]:
            if token_id is not None and token_id not in added:
                stretch.append(token_id)
                continue
            if stretch:
                parts.append(super()._decode(
                    stretch, skip_special_tokens=skip_special_tokens,
                    clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs))
                stretch = []
            if token_id is not None and not (skip_special_tokens and token_id in special):
                parts.append(added[token_id].content)
        return ''.join(parts)


# Text the checkpoint's own tokenizer must encode as SentencePiece does.
PROBE_TEXTS = ('Hello world', 'Describe the image briefly.', ' two  spaces, digits 2024\n\nend',
               'héllo wörld ∑ 你好 🙂')


def check_sentencepiece_ids(tokenizer, directory: str) -> None:
    """Raise a ValueError naming the fix when ``tokenizer`` (a checkpoint's
    own tokenizer class, ``use_checkpoint_code=True``) encodes text
    differently from ``directory``'s SentencePiece ``tokenizer.model``.

    Measured on internlm2-chat-7b's published fast tokenizer under
    transformers 5: wrong ids on 29 of 31 strings ("Hello world": [1, 1986,
    660, 971, 274, 1810, 1809] instead of [1, 1381, 660, 316, 1352, 1810, 1809]).
    """
    model_file = osp.join(directory, TOKENIZER_MODEL)
    if not osp.isfile(model_file):
        return
    import sentencepiece
    import transformers
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    for text in PROBE_TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if ids != sp.encode(text):
            raise ValueError(
                f"{directory}'s own tokenizer ({type(tokenizer).__name__}, loaded by "
                f'use_checkpoint_code=True) encodes {text!r} as {ids} under transformers '
                f'{transformers.__version__}; its {TOKENIZER_MODEL} gives {sp.encode(text)}. '
                'Drop use_checkpoint_code (and trust_remote_code) from the tokenizer config: '
                "the project's InternLM2Tokenizer gives SentencePiece's ids (the LLM can keep "
                'use_checkpoint_code)')


def is_internlm2_tokenizer_dir(directory: str) -> bool:
    """Whether ``directory``'s tokenizer_config.json names InternLM2's tokenizer."""
    path = osp.join(directory, 'tokenizer_config.json')
    if not osp.isfile(path):
        return False
    with open(path, encoding='utf-8') as f:
        return json.load(f).get('tokenizer_class') in PUBLISHED_CLASS_NAMES
