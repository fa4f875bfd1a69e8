"""Numerical equivalences the method relies on, on tiny random float64 models:
the compact no-image pass vs the reference's masked full-length pass, the
merged proxy LLM vs its PEFT adapter, and trainable-only checkpoints."""
import pytest
import torch
from mmengine.runner.checkpoint import load_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

import dpa  # noqa: F401  (registers the builders)
from dpa.models import HFCausalLM, LlavaDPAModel, ProxyLLMWrapper
from dpa.models.losses import IGNORE_INDEX
from dpa.registry import MODELS

IMAGE_ID = 3  # '<image>' in TinyTokenizer; checked below
IMAGE_TOKENS = 16  # tiny CLIP: (32 / 8) ** 2 patches, CLS dropped
PAD_ID = 0


def llm_cfg(model_type='llama', attn='sdpa'):
    return dict(
        type='HFCausalLM',
        config=dict(model_type=model_type, vocab_size=512, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=1024, tie_word_embeddings=False),
        torch_dtype='float64',
        attn_implementation=attn)


VISION_CFG = dict(
    type='HFVisionTower',
    config=dict(model_type='clip_vision_model', hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    feature_layer=-2,
    feature_select='patch')


def build_model(model_type='llama', attn='sdpa', loss=None, trainable=('projector', ),
                text_pass='removed', seed=0, loss_chunk_size=512):
    torch.manual_seed(seed)  # the projector draws from the global generator
    loss = loss or dict(type='VisualRelevanceLoss', mode='cmo')
    model = LlavaDPAModel(llm=llm_cfg(model_type, attn), tokenizer=dict(type='TinyTokenizer'),
                          vision_tower=VISION_CFG, loss=loss, trainable=trainable,
                          text_pass=text_pass, loss_chunk_size=loss_chunk_size)
    return model.double().eval()


# (text before <image>, text after) per row; None: a text-only row of 10 tokens.
ROWS = [(3, 6), (5, 3), None]


def make_batch(seed=1):
    """Right-padded batch: two image rows of different lengths, one text-only row."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for spec in ROWS:
        if spec is None:
            seqs.append(torch.randint(5, 175, (10, ), generator=g).tolist())
        else:
            before, after = spec
            seqs.append(torch.randint(5, 175, (before, ), generator=g).tolist()
                        + [IMAGE_ID] * IMAGE_TOKENS
                        + torch.randint(5, 175, (after, ), generator=g).tolist())
    length = max(map(len, seqs))
    input_ids = torch.full((len(seqs), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, seq in enumerate(seqs):
        input_ids[b, :len(seq)] = torch.tensor(seq)
        attention_mask[b, :len(seq)] = 1
    pixel_values = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    return input_ids, attention_mask, pixel_values


def reference_logits(model, embeds, attention_mask, position_ids, image_mask):
    """The reference's no-image pass: full length, image positions masked out,
    position ids unchanged."""
    return model.llm(inputs_embeds=embeds, attention_mask=attention_mask * (~image_mask),
                     position_ids=position_ids, use_cache=False).logits


def kept_positions(attention_mask, image_mask, b):
    return [p for p in range(attention_mask.shape[1])
            if attention_mask[b, p] and not image_mask[b, p]]


def passes(model, input_ids, attention_mask, pixel_values):
    with torch.no_grad():
        embeds, image_mask = model.embed(input_ids, pixel_values)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        results = {}
        for text_pass in ('removed', 'masked'):
            model.text_pass = text_pass
            outputs, text_index = model.text_only_outputs(embeds, attention_mask, position_ids,
                                                          image_mask)
            # The split LLM's pass gives hidden states: its head makes them logits.
            results[text_pass] = (model.split_llm.logits(outputs), text_index)
        ref = reference_logits(model, embeds, attention_mask, position_ids, image_mask)
    return embeds, image_mask, position_ids, results, ref


def test_image_token_id():
    from dpa.models import PROCESSORS
    assert PROCESSORS.build(dict(type='TinyTokenizer')).convert_tokens_to_ids('<image>') == IMAGE_ID
    assert build_model().vision_tower(torch.zeros(1, 3, 32, 32)).shape[1] == IMAGE_TOKENS


# --------------------------------------------------------------------------
# 1. Compact no-image pass == reference masked pass
# --------------------------------------------------------------------------
@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
@pytest.mark.parametrize('model_type', ['llama', 'qwen2'])
def test_removed_pass_equals_masked_pass(model_type, attn):
    model = build_model(model_type, attn)
    input_ids, attention_mask, pixel_values = make_batch()
    batch, length = input_ids.shape
    _, image_mask, _, results, ref = passes(model, input_ids, attention_mask, pixel_values)
    vocab = ref.shape[-1]
    assert torch.isfinite(ref).all()

    # The masked pass is the reference pass, read at positions 0..T-2 (the head
    # runs on fewer rows than in the LLM's forward: float64 rounding differs).
    masked_logits, masked_index = results['masked']
    torch.testing.assert_close(masked_logits.view(batch, length - 1, vocab), ref[:, :-1],
                               atol=1e-12, rtol=0)
    assert torch.equal(masked_index.view(-1), torch.arange(batch * (length - 1)))

    removed_logits, text_index = results['removed']
    image_rows = [b for b, spec in enumerate(ROWS) if spec is not None]
    text_len = max(len(kept_positions(attention_mask, image_mask, b)) for b in image_rows)
    assert removed_logits.shape == (len(image_rows) * text_len, vocab)
    compact = removed_logits.view(len(image_rows), text_len, vocab)

    # Eager attention takes its softmax in float32 even for a float64 model, and
    # the two passes sum over different key counts, so they agree to float32
    # rounding there; sdpa stays in float64. A wrong position or a leaked image
    # key moves the logits by ~1e-1.
    tol = 1e-6 if attn == 'eager' else 1e-10
    for r, b in enumerate(image_rows):
        kept = kept_positions(attention_mask, image_mask, b)
        before, after = ROWS[b]
        assert len(kept) == before + after
        for k, p in enumerate(kept):  # every text position, before and after the image
            assert (compact[r, k] - ref[b, p]).abs().max().item() < tol, (b, p)

    # text_index: target j (input position j+1) -> compact row of the kept token before it.
    for b in range(batch):
        kept = kept_positions(attention_mask, image_mask, b)
        r = image_rows.index(b) if b in image_rows else None
        for j in range(length - 1):
            t = j + 1
            if r is None or t not in kept or kept.index(t) == 0:
                assert text_index[b, j] == -1, (b, j)
            else:
                k = kept.index(t) - 1
                assert text_index[b, j] == r * text_len + k, (b, j)
                # ... and that row predicts from the kept token just before t.
                p = kept[k]
                assert (removed_logits[text_index[b, j]] - ref[b, p]).abs().max().item() < tol
    assert torch.all(text_index[2] == -1)  # the text-only row
    assert (text_index >= 0).sum() == sum(before + after - 1 for before, after in ROWS[:2])


# --------------------------------------------------------------------------
# 2. Contiguous renumbering is not equivalent
# --------------------------------------------------------------------------
@pytest.mark.parametrize('model_type', ['llama', 'qwen2'])
def test_contiguous_positions_are_not_equivalent(model_type):
    model = build_model(model_type)
    input_ids, attention_mask, pixel_values = make_batch()
    embeds, image_mask, position_ids, _, ref = passes(model, input_ids, attention_mask,
                                                      pixel_values)
    for b, (before, after) in enumerate(ROWS[:2]):
        kept = kept_positions(attention_mask, image_mask, b)
        text_embeds = embeds[b, kept].unsqueeze(0)
        mask = torch.ones(1, len(kept), dtype=torch.long)
        with torch.no_grad():
            original = model.llm(inputs_embeds=text_embeds, attention_mask=mask,
                                 position_ids=position_ids[b, kept].unsqueeze(0),
                                 use_cache=False).logits[0]
            renumbered = model.llm(inputs_embeds=text_embeds, attention_mask=mask,
                                   position_ids=torch.arange(len(kept)).unsqueeze(0),
                                   use_cache=False).logits[0]
        # With the original positions the compact pass is the reference pass...
        assert (original - ref[b, kept]).abs().max().item() < 1e-10
        # ... renumbered, the tokens after the image see a different relative
        # distance to those before it (RoPE) and their logits change.
        assert torch.equal(renumbered[:before], original[:before])
        assert (renumbered[before:] - original[before:]).abs().max().item() > 1e-4


# --------------------------------------------------------------------------
# 3. The CMO/CAL loss is the same with either pass
# --------------------------------------------------------------------------
def supervised_labels(model, input_ids, attention_mask, pixel_values):
    """Labels on every text token that follows another text token (not the
    first token after an image), set to the image pass's greedy prediction so
    that p_img is large and the weights spread over [delta_min, delta_max]."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for b, spec in enumerate(ROWS):
        n = int(attention_mask[b].sum())
        start = 2 if spec is None else spec[0] + IMAGE_TOKENS + 1
        labels[b, start:n] = input_ids[b, start:n]
    with torch.no_grad():
        greedy = model(input_ids, attention_mask, pixel_values=pixel_values,
                       mode='tensor').argmax(-1)
    labels[:, 1:] = torch.where(labels[:, 1:] != IGNORE_INDEX, greedy[:, :-1], labels[:, 1:])
    return labels


@pytest.mark.parametrize('mode,bounds', [('cmo', (0.05, 0.5)), ('cal', (1.0, 5.0))])
@pytest.mark.parametrize('model_type', ['llama', 'qwen2'])
def test_loss_same_with_removed_and_masked_pass(model_type, mode, bounds):
    loss = dict(type='VisualRelevanceLoss', mode=mode, clamp=bounds, window=3, scope='sequence')
    model = build_model(model_type, loss=loss)
    with torch.no_grad():  # sharper distributions, a stronger image: weights vary
        model.llm.lm_head.weight.mul_(40)
        model.projector.linear_2.weight.mul_(20)
    input_ids, attention_mask, pixel_values = make_batch()
    labels = supervised_labels(model, input_ids, attention_mask, pixel_values)
    out = {}
    for text_pass in ('removed', 'masked'):
        model.text_pass = text_pass
        with torch.no_grad():
            out[text_pass] = model(input_ids, attention_mask, labels, pixel_values)
    for key in ('loss', 'cmo_w_mean', 'cmo_at_min', 'cmo_at_max', 'cmo_delta_mean'):
        assert abs(out['removed'][key].item() - out['masked'][key].item()) < 1e-9, key
    # The weights are informative: not all clamped to one bound, and the
    # weighted loss differs from the plain mean CE.
    stats = out['removed']
    assert 0 < stats['cmo_at_min'].item() < 1 and stats['cmo_at_max'].item() < 1
    model.loss_fn.mode = 'vanilla'
    with torch.no_grad():
        vanilla = model(input_ids, attention_mask, labels, pixel_values)['loss']
    assert abs(vanilla.item() - stats['loss'].item()) > 1e-3


def test_reference_scope_is_rejected_with_removed_pass():
    # The removed pass has no scores at the image and padding positions that the
    # reference's batch-wide smoothing reads, so the combination is refused.
    loss = dict(type='VisualRelevanceLoss', mode='cal', clamp=(1.0, 5.0), window=3,
                scope='reference')
    with pytest.raises(ValueError, match="text_pass='masked'"):
        build_model('llama', loss=loss, text_pass='removed')
    build_model('llama', loss=loss, text_pass='masked')


def test_loss_runs_with_gradient_only_into_trainable_parts():
    model = build_model(loss=dict(type='VisualRelevanceLoss', mode='cmo')).train()
    input_ids, attention_mask, pixel_values = make_batch()
    labels = torch.where(attention_mask.bool() & (input_ids != IMAGE_ID), input_ids,
                         torch.full_like(input_ids, IGNORE_INDEX))
    model(input_ids, attention_mask, labels, pixel_values)['loss'].backward()
    for name, param in model.named_parameters():
        if name.startswith('projector.'):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def check_cmo_on_text_only_batch(text_pass):
    model = build_model(text_pass=text_pass)
    input_ids, attention_mask, _ = make_batch()
    input_ids, attention_mask = input_ids[2:], attention_mask[2:]  # the text-only row
    labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    with torch.no_grad():
        out = model(input_ids, attention_mask, labels)
        logits = model(input_ids, attention_mask, mode='tensor')
    vanilla = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:],
                                                ignore_index=IGNORE_INDEX)
    # Without an image every token gets delta_min: the vanilla loss.
    assert out['cmo_w_mean'].item() == pytest.approx(0.05)
    assert out['cmo_at_min'].item() == 1.0
    assert out['loss'].item() == pytest.approx(vanilla.item(), rel=1e-5)


def test_cmo_on_a_text_only_batch_masked_pass():
    check_cmo_on_text_only_batch('masked')


def test_cmo_on_a_text_only_batch_removed_pass():
    check_cmo_on_text_only_batch('removed')


# --------------------------------------------------------------------------
# 4. Merged proxy LLM == base + PEFT adapter
# --------------------------------------------------------------------------
def test_merged_proxy_equals_peft_adapter(tmp_path):
    cfg = llm_cfg('llama')
    peft_model = ProxyLLMWrapper(llm=cfg, lora=dict(r=8, lora_alpha=16,
                                                    target_modules='all-linear'))
    # LoRA B starts at zero (adapter == identity): randomise it so it matters.
    g = torch.Generator().manual_seed(0)
    lora_b = [p for n, p in peft_model.named_parameters() if 'lora_B' in n]
    assert lora_b and all(torch.all(p == 0) for p in lora_b)
    with torch.no_grad():
        for p in lora_b:
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))

    # 'all-linear' adapts every linear layer of the decoder, but not lm_head.
    adapted = {n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    linears = {n for n, m in peft_model.named_modules()
               if isinstance(m, nn.Linear) and '.lora_' not in n and not isinstance(m, LoraLayer)
               and n.split('.')[-1] not in ('base_layer', )}
    assert not any('lm_head' in n for n in adapted)
    assert isinstance(peft_model.get_output_embeddings(), nn.Linear)
    assert not isinstance(peft_model.get_output_embeddings(), LoraLayer)
    assert {n.split('.')[-1] for n in adapted} == {'q_proj', 'k_proj', 'v_proj', 'o_proj',
                                                   'gate_proj', 'up_proj', 'down_proj'}
    assert len(adapted) == 7 * 2
    assert linears == {'base_model.model.lm_head'}  # the only plain Linear left

    peft_model.save_pretrained(tmp_path)
    merged = ProxyLLMWrapper(llm=cfg, adapter=str(tmp_path)).eval()
    base = HFCausalLM(**{k: v for k, v in cfg.items() if k != 'type'}).eval()
    assert not any('lora' in n for n, _ in merged.named_parameters())
    assert type(merged) is type(base)

    input_ids = torch.randint(0, 512, (2, 9), generator=g)
    with torch.no_grad():
        adapter_logits = peft_model.eval()(input_ids=input_ids).logits
        merged_logits = merged(input_ids=input_ids).logits
        base_logits = base(input_ids=input_ids).logits
    assert merged_logits.dtype == torch.float64
    assert (merged_logits - adapter_logits).abs().max().item() < 1e-9
    assert (merged_logits - base_logits).abs().max().item() > 1e-3
    torch.testing.assert_close(merged.lm_head.weight, base.lm_head.weight, atol=0, rtol=0)


def test_proxy_wrapper_needs_a_source(tmp_path):
    with pytest.raises(ValueError, match='needs `lora`'):
        ProxyLLMWrapper(llm=llm_cfg())
    with pytest.raises(ValueError, match=r'lora\.r'):
        ProxyLLMWrapper(llm=llm_cfg(), lora=dict(r=0))
    with pytest.raises(ValueError, match='lora_dropout'):
        ProxyLLMWrapper(llm=llm_cfg(), lora=dict(r=4, lora_dropout=1.5))
    with pytest.raises(ValueError, match='does not know'):
        ProxyLLMWrapper(llm=llm_cfg(), lora=dict(r=4, rank=4))


def test_a_fresh_lora_goes_on_the_merged_proxy(tmp_path):
    """Stage 3 from the proxy with LoRA: the proxy's adapter is merged, the
    new adapter starts as the identity on top of it."""
    cfg = llm_cfg('llama')
    proxy = ProxyLLMWrapper(llm=cfg, lora=dict(r=4, target_modules='all-linear'))
    with torch.no_grad():
        for n, p in proxy.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.1)
    proxy.save_pretrained(tmp_path)
    merged = ProxyLLMWrapper(llm=cfg, adapter=str(tmp_path)).eval()
    both = ProxyLLMWrapper(llm=cfg, adapter=str(tmp_path), lora=dict(r=2)).eval()
    assert {n for n, p in both.named_parameters() if p.requires_grad} and all(
        'lora_' in n for n, p in both.named_parameters() if p.requires_grad)
    input_ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(both(input_ids=input_ids).logits,
                                   merged(input_ids=input_ids).logits, atol=0, rtol=0)


# --------------------------------------------------------------------------
# 5. Trainable-only state dict
# --------------------------------------------------------------------------
@pytest.mark.parametrize('trainable', [('projector', ), ('projector', 'llm')])
def test_state_dict_holds_trainable_weights_and_loads_back(trainable, capsys):
    source = build_model(trainable=trainable, seed=0)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    trainable_names = {n for n, p in source.named_parameters() if p.requires_grad}
    assert set(state) == trainable_names
    assert all(k.split('.')[0] in trainable for k in state)
    assert not any(k.startswith('vision_tower.') for k in state)

    target = build_model(trainable=trainable, seed=1)
    with torch.no_grad():  # a frozen weight the checkpoint must not touch
        target.vision_tower.model.embeddings.patch_embedding.weight.add_(1.0)
    frozen_before = {n: p.detach().clone() for n, p in target.named_parameters()
                     if not p.requires_grad}
    assert any(not torch.equal(target.state_dict().get(k, state[k]), state[k]) for k in state)

    capsys.readouterr()
    load_state_dict(target, state, strict=False)
    log = capsys.readouterr().out
    assert 'missing keys' not in log and 'unexpected key' not in log, log
    loaded = dict(target.named_parameters())
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    for n, v in frozen_before.items():
        assert torch.equal(loaded[n], v), n
    # torch's strict loading accepts the trainable-only dict too.
    assert not target.load_state_dict(state, strict=True).missing_keys


def test_missing_trainable_weight_is_reported(capsys):
    model = build_model()
    state = model.state_dict()
    state.pop('projector.linear_1.bias')
    capsys.readouterr()
    load_state_dict(model, state, strict=False)
    log = capsys.readouterr().out
    assert 'missing keys' in log and 'projector.linear_1.bias' in log
    assert 'llm.' not in log and 'vision_tower.' not in log


def test_activation_checkpointing_keeps_loss_and_gradients():
    """model.gradient_checkpointing=True recomputes the decoder layers in the
    backward pass: same CMO loss, same projector and LoRA gradients."""
    input_ids, attention_mask, pixel_values = make_batch()
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == IMAGE_ID), IGNORE_INDEX)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        llm = dict(type='ProxyLLMWrapper', llm=llm_cfg(),
                   lora=dict(r=4, lora_alpha=8, target_modules='all-linear'))
        model = LlavaDPAModel(llm=llm, tokenizer=dict(type='TinyTokenizer'),
                              vision_tower=VISION_CFG,
                              loss=dict(type='VisualRelevanceLoss', mode='cmo'),
                              trainable=('lora', 'projector'),
                              gradient_checkpointing=checkpointing).double().train()
        layers = model.llm.get_decoder().layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        loss = model(input_ids, attention_mask, labels, pixel_values)['loss']
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert any('lora_' in n for n in grads) and any('projector' in n for n in grads)
        results.append((loss.detach(), grads))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-12, rtol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-10, rtol=1e-8, msg=name)


def test_loss_and_gradients_equal_with_and_without_the_feature_cache(tmp_path):
    """The frozen tower's features read back from the cache give the loss and
    projector gradients of features computed in the step (float64)."""
    input_ids, attention_mask, pixel_values = make_batch()
    results = []
    for cache in (False, str(tmp_path), str(tmp_path)):  # off, filled, read back
        model = build_model()
        model.vision_tower.use_feature_cache = bool(cache)
        model.vision_tower.feature_cache_root = cache or None
        labels = supervised_labels(model, input_ids, attention_mask, pixel_values)
        model.train()
        loss = model(input_ids, attention_mask, labels, pixel_values)['loss']
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.projector.parameters()],
                        model.vision_tower._cache))
    (plain, plain_grads, _), (filled, _, writer), (read, read_grads, reader) = results
    assert writer.misses == 2 and (reader.misses, reader.hits) == (0, 4)
    assert torch.equal(plain, filled) and torch.equal(plain, read)
    # The read-back features are contiguous where the tower's are a strided
    # slice (CLS dropped): some CPUs' GEMM kernels then round the float64
    # gradient sums in another order (seen: 5e-18 apart, on gradients of 1e-3).
    for a, b in zip(plain_grads, read_grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------
# The lazy no-image pass: after the image scores, for the targets above the floor
# --------------------------------------------------------------------------
def count_passes(model):
    """Record the (rows, length) of every decoder pass of ``model``."""
    shapes = []
    run = model.split_llm.hidden_states

    def recorded(embeds, attention_mask, position_ids):
        shapes.append(tuple(embeds.shape[:2]))
        return run(embeds, attention_mask, position_ids)
    model.split_llm.hidden_states = recorded
    return shapes


@pytest.mark.parametrize('model_type', ['llama', 'qwen2'])
def test_lazy_text_pass_equals_the_full_pass(model_type):
    """CMO runs the removed pass after the image scores, on the rows with a
    target above delta_min, each cut after its last such target: the same
    weights, loss, statistics and gradients as the full pass before it."""
    model = build_model(model_type, loss=dict(type='VisualRelevanceLoss', mode='cmo'),
                        trainable=('llm', 'projector'))
    with torch.no_grad():  # sharper distributions, a stronger image: weights vary
        model.llm.lm_head.weight.mul_(40)
        model.projector.linear_2.weight.mul_(20)
    input_ids, attention_mask, pixel_values = make_batch()
    labels = supervised_labels(model, input_ids, attention_mask, pixel_values)
    # The second image row's targets: its last two at the floor, the others not.
    labels[1, -2:] = torch.where(labels[1, -2:] != IGNORE_INDEX, 7, labels[1, -2:])
    assert model.loss_fn.skips_floor_targets
    shapes = count_passes(model)
    out, grads, scores = {}, {}, {}
    for lazy in (False, True):
        model.zero_grad()
        inputs = model.loss_inputs(input_ids, attention_mask, labels, pixel_values, lazy=lazy)
        out[lazy] = model.loss_fn(**inputs)
        out[lazy]['loss'].backward()
        grads[lazy] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None}
        inputs = model.loss_inputs(input_ids, attention_mask, labels, pixel_values, lazy=lazy)
        scores[lazy] = model.loss_fn.token_scores(**inputs)
    for key, value in out[False].items():
        torch.testing.assert_close(out[True][key], value, rtol=1e-12, atol=1e-12, msg=key)
    assert 0 < out[True]['cmo_at_min'].item() < 1
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-12, atol=1e-12, msg=name)
    for key in ('score_img', 'weight', 'clamped_delta', 'logp'):
        torch.testing.assert_close(scores[True][key], scores[False][key], rtol=1e-12,
                                   atol=1e-12, msg=key)
    # NaN where the text score was not computed, the same in both.
    torch.testing.assert_close(scores[True]['score_txt'], scores[False]['score_txt'],
                               rtol=1e-12, atol=1e-12, equal_nan=True)
    # The full pass: both image rows, whole; the lazy one: shorter.
    # Full: the text pass, then the image pass; lazy: the image pass first.
    full, lazy = shapes[0], shapes[5]
    assert shapes[1] == shapes[4] == tuple(input_ids.shape)
    assert full[0] == 2 and lazy[0] <= 2 and lazy[1] < full[1]


def test_lazy_text_pass_runs_nothing_when_every_target_is_at_the_floor():
    model = build_model(loss=dict(type='VisualRelevanceLoss', mode='cmo'))
    input_ids, attention_mask, pixel_values = make_batch()
    labels = torch.where(attention_mask.bool() & (input_ids != IMAGE_ID), input_ids,
                         torch.full_like(input_ids, IGNORE_INDEX))
    shapes = count_passes(model)
    with torch.no_grad():
        lazy = model(input_ids, attention_mask, labels, pixel_values)
        assert shapes == [tuple(input_ids.shape)]  # the image pass alone
        full = model.loss_fn(**model.loss_inputs(input_ids, attention_mask, labels,
                                                 pixel_values))
    assert lazy['cmo_at_min'].item() == 1.0
    for key, value in full.items():
        torch.testing.assert_close(lazy[key], value, rtol=0, atol=0, msg=key)


def test_a_frozen_tower_computes_its_features_outside_the_stages_autocast(tmp_path):
    """Under the stage's bf16 autocast (mixed_precision='bfloat16') a frozen
    float32 tower gives the features it gives without it, bit for bit, and a
    feature cache filled under autocast serves a float32 run those features."""
    tower = MODELS.build(dict(VISION_CFG, feature_cache=str(tmp_path))).float()
    tower.requires_grad_(False)
    pixels = torch.randn(2, 3, 32, 32)
    plain = tower.compute_features(pixels)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        under = tower.compute_features(pixels)
        cached = tower(pixels)  # fills the cache under autocast
        # What autocast would have made of them: other features.
        assert not torch.equal(tower.model(pixels, output_hidden_states=True)
                               .hidden_states[tower.feature_layer][:, 1:].float(), plain)
    assert under.dtype == torch.float32 and torch.equal(under, plain)
    read = MODELS.build(dict(VISION_CFG, feature_cache=str(tmp_path))).float()
    read.model.load_state_dict(tower.model.state_dict())
    read.requires_grad_(False)
    assert torch.equal(cached, plain) and torch.equal(read(pixels), plain)
    assert read._cache.hits == 2 and read._cache.misses == 0
