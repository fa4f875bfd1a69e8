"""The project's InternLM2 (dpa/models/internlm2): the published checkpoints'
names and config fields, transformers' Llama computation on the same weights,
loading without running a checkpoint's code, generation with the KV cache,
and a tokenizer with SentencePiece's own ids."""
import io
import json
import random
import shutil

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import dpa  # noqa: F401  (registers InternLM2)
from dpa.models.builders import IMAGE_TOKEN, PROCESSORS
from dpa.models.chat_templates import load_chat_template
from dpa.models.mllm import enable_activation_checkpointing
from dpa.models.internlm2 import (InternLM2Config, InternLM2ForCausalLM, InternLM2Model,
                                  InternLM2Tokenizer)
from dpa.models.internlm2 import modeling_internlm2
from dpa.registry import MODELS

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
            rms_norm_eps=1e-5, bias=False, rope_theta=10000.0)
# internlm/internlm2-chat-7b's config.json (revision of 2024-03: rope_scaling null).
PUBLISHED_CONFIG = {
    'architectures': ['InternLM2ForCausalLM'], 'attn_implementation': 'eager',
    'auto_map': {'AutoConfig': 'configuration_internlm2.InternLM2Config',
                 'AutoModel': 'modeling_internlm2.InternLM2ForCausalLM',
                 'AutoModelForCausalLM': 'modeling_internlm2.InternLM2ForCausalLM'},
    'bias': False, 'bos_token_id': 1, 'eos_token_id': 2, 'hidden_act': 'silu',
    'hidden_size': 4096, 'initializer_range': 0.02, 'intermediate_size': 14336,
    'max_position_embeddings': 32768, 'model_type': 'internlm2', 'num_attention_heads': 32,
    'num_hidden_layers': 32, 'num_key_value_heads': 8, 'pad_token_id': 2, 'rms_norm_eps': 1e-05,
    'rope_scaling': None, 'rope_theta': 1000000, 'tie_word_embeddings': False,
    'torch_dtype': 'bfloat16', 'transformers_version': '4.41.0', 'use_cache': True,
    'vocab_size': 92544}


# Tiny matrices gain nothing from intra-op threads on a busy machine.
pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_model(seed=0, dtype=torch.float64, attn='eager', **overrides):
    config = InternLM2Config(**{**TINY, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = InternLM2ForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # away from the init: norms, larger logits
        for name, param in model.named_parameters():
            if name.endswith('norm.weight'):
                param.uniform_(0.5, 1.5)
        model.output.weight.mul_(20)
    return model


def ids_of(length, batch=2, seed=0):
    return torch.randint(3, TINY['vocab_size'], (batch, length),
                         generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- #
# Config and registration
# --------------------------------------------------------------------------- #

def test_published_config_reads_unchanged(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps(PUBLISHED_CONFIG))
    config = AutoConfig.from_pretrained(str(tmp_path))
    assert type(config) is InternLM2Config
    for key, value in PUBLISHED_CONFIG.items():
        if key not in ('auto_map', 'torch_dtype', 'transformers_version', 'attn_implementation'):
            assert getattr(config, key) == value, key
    config.save_pretrained(str(tmp_path / 'saved'))
    saved = json.loads((tmp_path / 'saved' / 'config.json').read_text())
    assert saved['rope_scaling'] is None and saved['rope_theta'] == 1000000
    assert 'auto_map' not in saved  # a saved copy names no code it does not ship


def test_rope_scaling_keeps_internlm2_format_and_rejects_others():
    config = InternLM2Config(**{**TINY, 'rope_scaling': {'type': 'dynamic', 'factor': 2.0}})
    assert config.rope_scaling == {'type': 'dynamic', 'factor': 2.0}
    assert InternLM2Config.from_dict(config.to_dict()).rope_scaling == config.rope_scaling
    for bad, match in (({'type': 'yarn', 'factor': 2.0}, 'must be one of'),
                       ({'type': 'linear', 'factor': 0.5}, 'number >= 1'),
                       ({'rope_type': 'dynamic', 'factor': 2.0}, 'rope_scaling must be')):
        with pytest.raises(ValueError, match=match):
            InternLM2Config(**{**TINY, 'rope_scaling': bad})
    with pytest.raises(ValueError, match='multiple of num_key_value_heads'):
        InternLM2Config(**{**TINY, 'num_key_value_heads': 3})


def test_auto_classes_resolve_to_the_project_implementation():
    config = AutoConfig.for_model('internlm2', **TINY)
    assert type(config) is InternLM2Config
    assert type(AutoModelForCausalLM.from_config(config)) is InternLM2ForCausalLM
    assert type(transformers.AutoModel.from_config(config)) is InternLM2Model


def test_parameter_names_are_the_published_ones():
    names = set(tiny_model().state_dict())
    layer = 'model.layers.0.'
    expected = {'model.tok_embeddings.weight', 'model.norm.weight', 'output.weight',
                layer + 'attention.wqkv.weight', layer + 'attention.wo.weight',
                layer + 'feed_forward.w1.weight', layer + 'feed_forward.w2.weight',
                layer + 'feed_forward.w3.weight', layer + 'attention_norm.weight',
                layer + 'ffn_norm.weight'}
    assert expected <= names
    assert not any('rotary' in name or 'inv_freq' in name for name in names)
    assert tiny_model(bias=True).model.layers[0].attention.wqkv.bias is not None
    # (heads + 2 * kv_heads) * head_dim rows: 4 query, 2 key, 2 value heads of 8.
    assert tiny_model().model.layers[0].attention.wqkv.weight.shape == (64, 32)


def write_checkpoint_code(directory, modeling_text):
    """A checkpoint that ships its own code, like the published ones."""
    source = modeling_internlm2.__file__.replace('modeling_internlm2.py', '')
    shutil.copy(source + 'configuration_internlm2.py', directory / 'configuration_internlm2.py')
    (directory / 'modeling_internlm2.py').write_text(modeling_text)
    config = json.loads((directory / 'config.json').read_text())
    config['auto_map'] = PUBLISHED_CONFIG['auto_map']
    (directory / 'config.json').write_text(json.dumps(config))


def test_checkpoint_code_runs_only_on_request(tmp_path):
    model = tiny_model()
    model.save_pretrained(str(tmp_path))
    # Code that refuses to run: loading must not import it unless asked to.
    write_checkpoint_code(tmp_path, "raise RuntimeError('checkpoint code was executed')\n")
    for trusted in (False, True):  # transformers 5 prefers the registered class either way
        llm = MODELS.build(dict(type='HFCausalLM', pretrained=str(tmp_path), torch_dtype='float64',
                                attn_implementation='eager', trust_remote_code=trusted))
        assert type(llm) is InternLM2ForCausalLM
        assert all(torch.equal(llm.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match='set trust_remote_code=True'):
        MODELS.build(dict(type='HFCausalLM', pretrained=str(tmp_path), use_checkpoint_code=True))
    with pytest.raises(RuntimeError, match='checkpoint code was executed'):
        MODELS.build(dict(type='HFCausalLM', pretrained=str(tmp_path), use_checkpoint_code=True,
                          trust_remote_code=True))


def test_checkpoint_code_switch_loads_the_checkpoints_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(str(tmp_path))
    # The checkpoint's "own" code: a copy of the project's, loaded as a dynamic module.
    with open(modeling_internlm2.__file__) as f:
        write_checkpoint_code(tmp_path, f.read())
    llm = MODELS.build(dict(type='HFCausalLM', pretrained=str(tmp_path), torch_dtype='float64',
                            attn_implementation='eager', trust_remote_code=True,
                            use_checkpoint_code=True))
    assert type(llm).__name__ == 'InternLM2ForCausalLM' and type(llm) is not InternLM2ForCausalLM
    assert type(llm).__module__.startswith('transformers_modules.')
    ids = ids_of(9)
    with torch.no_grad():
        assert (llm(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-12


# --------------------------------------------------------------------------- #
# The computation: transformers' Llama on the same weights
# --------------------------------------------------------------------------- #

def as_llama(model):
    """transformers' LlamaForCausalLM with ``model``'s weights: InternLM2 is
    Llama with a fused, per-key/value-head grouped ``wqkv``."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    groups = heads // kv_heads
    rope = {'rope_type': 'default', 'rope_theta': config.rope_theta}
    if config.rope_scaling is not None:
        rope.update(rope_type=config.rope_scaling['type'], factor=config.rope_scaling['factor'])
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        attention_bias=config.bias, rope_parameters=rope, tie_word_embeddings=False)
    llama_config._attn_implementation = 'eager'
    llama = LlamaForCausalLM(llama_config).to(model.dtype).eval()
    weights = {'model.embed_tokens.weight': model.model.tok_embeddings.weight,
               'model.norm.weight': model.model.norm.weight, 'lm_head.weight': model.output.weight}
    for i, layer in enumerate(model.model.layers):
        prefix = f'model.layers.{i}.'
        wqkv = layer.attention.wqkv.weight.view(kv_heads, groups + 2, head_dim, -1)
        weights.update({
            prefix + 'self_attn.q_proj.weight': wqkv[:, :groups].reshape(heads * head_dim, -1),
            prefix + 'self_attn.k_proj.weight': wqkv[:, -2].reshape(kv_heads * head_dim, -1),
            prefix + 'self_attn.v_proj.weight': wqkv[:, -1].reshape(kv_heads * head_dim, -1),
            prefix + 'self_attn.o_proj.weight': layer.attention.wo.weight,
            prefix + 'mlp.gate_proj.weight': layer.feed_forward.w1.weight,
            prefix + 'mlp.up_proj.weight': layer.feed_forward.w3.weight,
            prefix + 'mlp.down_proj.weight': layer.feed_forward.w2.weight,
            prefix + 'input_layernorm.weight': layer.attention_norm.weight,
            prefix + 'post_attention_layernorm.weight': layer.ffn_norm.weight})
    llama.load_state_dict(weights, strict=True)
    return llama


@pytest.mark.parametrize('rope_scaling', [None, {'type': 'linear', 'factor': 2.0},
                                          {'type': 'dynamic', 'factor': 2.0}])
def test_logits_equal_transformers_llama_on_the_same_weights(rope_scaling):
    model = tiny_model(rope_scaling=rope_scaling)
    llama = as_llama(model)
    ids = ids_of(40)  # beyond max_position_embeddings=16: dynamic NTK scales
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = llama(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max() < 1e-10


def test_sdpa_equals_eager():
    eager = tiny_model(dtype=torch.float32)
    sdpa = tiny_model(dtype=torch.float32, attn='sdpa')
    ids = ids_of(12)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).logits
        got = sdpa(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-4)


# Eager attention takes its softmax in float32 (as the published code does):
# rows of 30 and of 13 keys are summed in a different order.
@pytest.mark.parametrize('attn, tolerance', [('sdpa', 1e-12), ('eager', 1e-6)])
def test_positions_beyond_the_sequence_length(attn, tolerance):
    """The no-image pass keeps the original position ids of the kept tokens."""
    model = tiny_model(rope_scaling={'type': 'dynamic', 'factor': 2.0}, attn=attn)
    ids = ids_of(30, batch=1)
    keep = torch.tensor([i for i in range(30) if not 3 <= i < 20])  # 13 tokens, ids up to 29
    removed = torch.ones(1, 30, dtype=torch.long)
    removed[0, 3:20] = 0
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=removed).logits[0, keep]
        compact = model(input_ids=ids[:, keep], attention_mask=torch.ones(1, len(keep),
                                                                          dtype=torch.long),
                        position_ids=keep.unsqueeze(0)).logits[0]
        renumbered = model(input_ids=ids[:, keep]).logits[0]
    assert (compact - masked).abs().max() < tolerance
    assert (renumbered - masked).abs().max() > 1e-3  # the positions matter


def test_packed_rows_keep_samples_apart():
    model = tiny_model(attn='sdpa')
    first, second = ids_of(5, batch=1, seed=1), ids_of(7, batch=1, seed=2)
    packed = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        # Without a cache, as training runs (transformers reads restarts only then).
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
    assert (together[:, 5:] - alone).abs().max() < 1e-10


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            enable_activation_checkpointing(model)  # as LlavaDPAModel does
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        ids = ids_of(10)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-12) for n in grads[0])


# --------------------------------------------------------------------------- #
# Loading like a checkpoint, tied weights, generation with the cache
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize('tie', [False, True])
def test_save_and_load_give_the_same_model(tmp_path, tie):
    model = tiny_model(tie_word_embeddings=tie, rope_scaling={'type': 'dynamic', 'factor': 2.0})
    assert (model.output.weight is model.model.tok_embeddings.weight) == tie
    model.save_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float64,
                                                  attn_implementation='eager').eval()
    assert (loaded.output.weight is loaded.model.tok_embeddings.weight) == tie
    ids = ids_of(40)
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-12


def test_generation_with_cache_matches_full_passes():
    model = tiny_model(dtype=torch.float32, max_position_embeddings=64)
    ids = ids_of(6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as batched generation pads
    # min_new_tokens: no early stop at EOS; `logits` are the raw ones.
    kwargs = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
    uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(set(cached.sequences[0, 6:].tolist())) > 2  # not one token repeated
    full_mask = torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(input_ids=cached.sequences, attention_mask=full_mask,
                     position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    for step, logits in enumerate(cached.logits):
        assert torch.allclose(logits, full[:, 5 + step], atol=1e-5), step
    # From embeddings, as the LLaVA path generates.
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, **kwargs)
    assert torch.equal(from_embeds.sequences, cached.sequences[:, 6:])


def test_cache_holds_the_keys_of_every_layer():
    model = tiny_model()
    with torch.no_grad():
        out = model(input_ids=ids_of(7), use_cache=True)
    assert isinstance(out.cache, transformers.DynamicCache)
    assert out.cache.get_seq_length() == 7 and len(out.cache.layers) == TINY['num_hidden_layers']


# --------------------------------------------------------------------------- #
# Tokenizer: SentencePiece's ids, trained here on a small corpus
# --------------------------------------------------------------------------- #

CHAT_SPECIALS = ['<|im_start|>', '<|im_end|>', '<|action_start|>', '<|action_end|>',
                 '<|interpreter|>', '<|plugin|>']
SAMPLES = ['Describe the image briefly.', ' there is  one shape\n\nwhat colour is it? 2024',
           'héllo wörld ∑ 你好 🙂', 'tabs\tand trailing spaces  ', 'a red circle on the left.']
WORDS = ('a red green blue circle square on the left right of white background describe image '
         'briefly there is one shape what colour it the user assistant system hi hello').split()


def train_sentencepiece(path, add_dummy_prefix):
    """A BPE model with InternLM2's trainer settings (byte fallback, split
    digits, identity normalization, the chat tokens as user-defined pieces)."""
    import sentencepiece as spm
    rng = random.Random(0)
    corpus = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
              + rng.choice(['.', '?', '!', ' 123.', '\n']) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type='bpe', vocab_size=420,
        byte_fallback=True, split_digits=True, add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, normalization_rule_name='identity',
        allow_whitespace_only_pieces=True, user_defined_symbols=CHAT_SPECIALS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


def published_tokenizer_dir(tmp_path, add_dummy_prefix):
    """tokenizer.model + the published tokenizer_config.json (no tokenizer.json)."""
    sp = train_sentencepiece(tmp_path / 'tokenizer.model', add_dummy_prefix)
    added = {str(sp.piece_to_id(t)): dict(content=t, lstrip=False, normalized=False,
                                          rstrip=False, single_word=False, special=True)
             for t in ['<unk>', '<s>', '</s>'] + CHAT_SPECIALS}
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(dict(
        tokenizer_class='InternLM2Tokenizer', add_bos_token=True, add_eos_token=False,
        bos_token='<s>', eos_token='</s>', pad_token='</s>', unk_token='<unk>',
        added_tokens_decoder=added, additional_special_tokens=CHAT_SPECIALS,
        chat_template=load_chat_template('internlm2'), clean_up_tokenization_spaces=False,
        auto_map={'AutoTokenizer': ['tokenization_internlm2.InternLM2Tokenizer',
                                    'tokenization_internlm2_fast.InternLM2TokenizerFast']})))
    (tmp_path / 'config.json').write_text(json.dumps({**PUBLISHED_CONFIG, **TINY}))
    return sp


def sentencepiece_ids(sp, text, added):
    """The published (transformers 4) tokenizer's ids: SentencePiece on each
    stretch of text between special tokens, the special tokens' own ids
    (``added``: tokens past SentencePiece's vocabulary, with their ids)."""
    specials = {t: sp.piece_to_id(t) for t in CHAT_SPECIALS + ['<s>', '</s>']}
    specials.update(added)
    ids, rest = [], text
    while rest:
        found = [(rest.find(t), t) for t in specials if t in rest]
        if not found:
            return ids + sp.encode(rest)
        at, token = min(found)
        ids += sp.encode(rest[:at]) + [specials[token]]
        rest = rest[at + len(token):]
    return ids


@pytest.mark.parametrize('add_dummy_prefix', [True, False])
def test_tokenizer_ids_are_sentencepiece_ids(tmp_path, add_dummy_prefix):
    sp = published_tokenizer_dir(tmp_path, add_dummy_prefix)
    tokenizer = PROCESSORS.build(dict(type='HFTokenizer', pretrained=str(tmp_path)))
    assert isinstance(tokenizer, InternLM2Tokenizer) and tokenizer.is_fast
    for text in SAMPLES:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == sp.encode(text), text
        assert tokenizer(text).input_ids == [sp.bos_id()] + ids  # add_bos_token, as published
        assert tokenizer.decode(ids) == sp.decode(ids) == text
    # The chat template writes <s> itself: no second BOS.
    messages = [{'role': 'user', 'content': IMAGE_TOKEN + '\nDescribe the image briefly.'},
                {'role': 'assistant', 'content': 'a red circle on the left.'}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith('<s><|im_start|>user\n')
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)['input_ids']
    assert ids[:2] == [sp.bos_id(), sp.piece_to_id('<|im_start|>')] and ids.count(1) == 1
    # <image> is added by the pipeline: one id past SentencePiece's vocabulary.
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == sp.get_piece_size() and ids.count(image_id) == 1
    assert ids == sentencepiece_ids(sp, text, {IMAGE_TOKEN: image_id})
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoding.input_ids == ids and len(encoding.offset_mapping) == len(ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith('user\n')
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == sp.eos_id()


def test_saved_tokenizer_loads_back_with_the_same_ids(tmp_path):
    sp = published_tokenizer_dir(tmp_path, add_dummy_prefix=True)
    tokenizer = PROCESSORS.build(dict(type='HFTokenizer', pretrained=str(tmp_path)))
    tokenizer.save_pretrained(str(tmp_path / 'saved'))
    assert (tmp_path / 'saved' / 'tokenizer.json').is_file()
    again = PROCESSORS.build(dict(type='HFTokenizer', pretrained=str(tmp_path / 'saved')))
    assert isinstance(again, InternLM2Tokenizer)
    for text in SAMPLES + ['<s><|im_start|>user\nhi<|im_end|>\n']:
        assert again(text).input_ids == tokenizer(text).input_ids
    assert again(SAMPLES[0], add_special_tokens=False).input_ids == sp.encode(SAMPLES[0])


def test_tokenizer_directory_without_a_model_is_refused(tmp_path):
    published_tokenizer_dir(tmp_path, add_dummy_prefix=True)
    (tmp_path / 'tokenizer.model').unlink()
    with pytest.raises(ValueError, match='tokenizer.model'):
        PROCESSORS.build(dict(type='HFTokenizer', pretrained=str(tmp_path)))


def test_tokenizer_checkpoint_code_runs_only_on_request(tmp_path):
    published_tokenizer_dir(tmp_path, add_dummy_prefix=True)
    for name in ('tokenization_internlm2.py', 'tokenization_internlm2_fast.py'):
        (tmp_path / name).write_text("raise RuntimeError('tokenizer code was executed')\n")
    assert isinstance(PROCESSORS.build(dict(type='HFTokenizer', pretrained=str(tmp_path),
                                            trust_remote_code=True)), InternLM2Tokenizer)
    with pytest.raises(RuntimeError, match='tokenizer code was executed'):
        PROCESSORS.build(dict(type='HFTokenizer', pretrained=str(tmp_path),
                              trust_remote_code=True, use_checkpoint_code=True))


# --------------------------------------------------------------------------- #
# What a real checkpoint brings (issue 23): its own fast tokenizer, configs
# re-saved by transformers 5, the final model's tokenizer, older snapshots
# --------------------------------------------------------------------------- #

# The shape of internlm2-chat-7b's published tokenization_internlm2_fast.py: a
# PreTrainedTokenizerFast (transformers 5: a TokenizersBackend) over
# tokenizer.model. transformers 5 builds it with ids other than SentencePiece's.
CHECKPOINT_FAST_TOKENIZER = '''
from transformers import PreTrainedTokenizerFast


class InternLM2TokenizerFast(PreTrainedTokenizerFast):
    vocab_files_names = {"vocab_file": "./tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, tokenizer_file=None, unk_token="<unk>", bos_token="<s>",
                 eos_token="</s>", pad_token="</s>", add_bos_token=True, add_eos_token=False,
                 **kwargs):
        super().__init__(vocab_file=vocab_file, tokenizer_file=tokenizer_file,
                         unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, **kwargs)
'''


def test_checkpoint_tokenizer_with_other_ids_is_refused_with_the_fix(tmp_path):
    sp = published_tokenizer_dir(tmp_path, add_dummy_prefix=True)
    (tmp_path / 'tokenization_internlm2_fast.py').write_text(CHECKPOINT_FAST_TOKENIZER)
    spec = dict(type='HFTokenizer', pretrained=str(tmp_path), trust_remote_code=True,
                use_checkpoint_code=True)
    with pytest.raises(ValueError) as err:
        PROCESSORS.build(spec)
    message = str(err.value)
    assert f"its tokenizer.model gives {sp.encode('Hello world')}" in message
    assert 'Drop use_checkpoint_code (and trust_remote_code) from the tokenizer config' in message
    # Checkpoint code that encodes as SentencePiece does is taken as it is.
    (tmp_path / 'tokenization_internlm2_fast.py').write_text(
        'from dpa.models.internlm2 import InternLM2Tokenizer\n\n\n'
        'class InternLM2TokenizerFast(InternLM2Tokenizer):\n    pass\n')
    tokenizer = PROCESSORS.build(spec)
    assert type(tokenizer).__module__.startswith('transformers_modules.')
    assert tokenizer('Hello world', add_special_tokens=False).input_ids == sp.encode('Hello world')


@pytest.mark.parametrize('with_config', [True, False])
def test_saved_tokenizer_loads_with_and_without_remote_code(tmp_path, with_config):
    sp = published_tokenizer_dir(tmp_path, add_dummy_prefix=True)
    tokenizer = PROCESSORS.build(dict(type='HFTokenizer', pretrained=str(tmp_path)))
    saved = tmp_path / 'saved'
    tokenizer.save_pretrained(str(saved))
    if with_config:  # as in the final model's llm/
        InternLM2Config(**TINY).save_pretrained(str(saved))
    assert 'auto_map' not in json.loads((saved / 'tokenizer_config.json').read_text())
    chat = '<s><|im_start|>user\n<image>\nhi<|im_end|>\n'
    for trusted in (False, True):
        # transformers 5 picks its generic TokenizersBackend for internlm2 (or an
        # unknown class): the saved tokenizer.json gives the same ids.
        again = transformers.AutoTokenizer.from_pretrained(str(saved), trust_remote_code=trusted)
        for text in SAMPLES:
            assert again(text, add_special_tokens=False).input_ids == sp.encode(text)
        assert again(chat).input_ids == tokenizer(chat).input_ids


# What transformers 5 writes when it re-saves the published config class with
# dynamic NTK (measured: its rope_scaling setter moves the dict here).
RESAVED_ROPE = {'rope_parameters': {'factor': 2.0, 'rope_theta': 1000000, 'rope_type': 'dynamic',
                                    'type': 'dynamic'}, 'rope_theta': 1000000}


def test_rope_settings_re_saved_by_transformers5_are_read(tmp_path):
    model = tiny_model(rope_theta=1000000, rope_scaling={'type': 'dynamic', 'factor': 2.0})
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / 'config.json').read_text())
    config.pop('rope_scaling')
    (tmp_path / 'config.json').write_text(json.dumps({**config, **RESAVED_ROPE}))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float64,
                                                  attn_implementation='eager').eval()
    assert loaded.config.rope_scaling == {'type': 'dynamic', 'factor': 2.0}
    assert loaded.config.rope_theta == 1000000
    ids = ids_of(40)  # beyond max_position_embeddings=16: the scaling acts
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-12
    sizes = {k: v for k, v in TINY.items() if k != 'rope_theta'}
    default = InternLM2Config(**sizes, rope_parameters={'rope_type': 'default', 'rope_theta': 5e5})
    assert (default.rope_theta, default.rope_scaling) == (5e5, None)
    for bad, match in (({'rope_scaling': {'type': 'linear', 'factor': 2.0}},
                        'rope_scaling .* disagree'),
                       ({'rope_theta': 10000.0}, 'rope_theta 10000.0 and .* disagree'),
                       ({'rope_parameters': {'rope_type': 'yarn', 'factor': 2.0}},
                        "rope_type 'yarn' is not one InternLM2 has")):
        with pytest.raises(ValueError, match=match):
            InternLM2Config(**{**sizes, 'rope_parameters': RESAVED_ROPE['rope_parameters'], **bad})


def test_snapshots_before_2024_01_24_load_as_internlm2(tmp_path):
    model = tiny_model()
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / 'config.json').read_text())
    # The renamed field; the rest as published.
    config.update(model_type='internlm', auto_map=PUBLISHED_CONFIG['auto_map'],
                  architectures=['InternLM2ForCausalLM'])
    (tmp_path / 'config.json').write_text(json.dumps(config))
    llm = MODELS.build(dict(type='HFCausalLM', pretrained=str(tmp_path), torch_dtype='float64',
                            attn_implementation='eager'))
    assert type(llm) is InternLM2ForCausalLM and llm.config.model_type == 'internlm2'
    ids = ids_of(9)
    with torch.no_grad():
        assert (llm(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-12
    from dpa.models.builders import hf_config
    assert type(hf_config(str(tmp_path))) is InternLM2Config
    # InternLM (version 1) shares the model_type: refused by name.
    config.update(architectures=['InternLMForCausalLM'],
                  auto_map={'AutoConfig': 'configuration_internlm.InternLMConfig'})
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match='is InternLM version 1'):
        hf_config(str(tmp_path))
