"""The two opt-in switches of CMO's no-image context, on tiny random float64
models (saved and reloaded from their HF configs): ``model.min_text_context``
(a target is scored without the image only after k text tokens) and
``model.text_pass_prompt`` (a caption prompt stands where the image was).
Both must give the same scores in the removed, masked and lazy passes, and
leave today's pass as it is when unset."""
import pytest
import torch

import dpa  # noqa: F401  (registers the builders)
from dpa.engine.config_guard import check_cfg_options
from dpa.engine.preflight import resolve_config
from dpa.errors import ConfigError
from dpa.models import PROCESSORS, LlavaDPAModel
from dpa.models.losses import IGNORE_INDEX
from test_model_equivalence import (IMAGE_ID, IMAGE_TOKENS, ROWS, VISION_CFG, kept_positions,
                                    llm_cfg, make_batch)
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures('one_thread')

PROMPT = 'Describe the image briefly.'
CMO = dict(type='VisualRelevanceLoss', mode='cmo', clamp=(0.05, 0.5), window=1)
# How each pass is run: (model.text_pass, loss_inputs(lazy=...)).
PASSES = {'removed': ('removed', False), 'masked': ('masked', False), 'lazy': ('removed', True)}


def build(model_type='llama', loss=CMO, sharpen=True, **switches):
    torch.manual_seed(0)  # the projector draws from the global generator
    model = LlavaDPAModel(llm=llm_cfg(model_type), tokenizer=dict(type='TinyTokenizer'),
                          vision_tower=VISION_CFG, loss=loss, trainable=('projector', ),
                          **switches).double().eval()
    if sharpen:  # sharper distributions, a stronger image: the weights vary
        with torch.no_grad():
            model.llm.get_output_embeddings().weight.mul_(40)
            model.projector.linear_2.weight.mul_(20)
    return model


def prompt_ids():
    tokenizer = PROCESSORS.build(dict(type='TinyTokenizer'))
    return tokenizer(PROMPT, add_special_tokens=False)['input_ids']


def scores(model, name, input_ids, attention_mask, labels, pixel_values):
    """The loss's per-target scores (every text score computed) and its
    statistics, with the no-image pass ``name`` of :data:`PASSES`."""
    model.text_pass, lazy = PASSES[name]
    with torch.no_grad():
        inputs = model.loss_inputs(input_ids, attention_mask, labels, pixel_values, lazy=lazy)
        dense = model.loss_fn.token_scores(**inputs, score_all_text=True)
        inputs = model.loss_inputs(input_ids, attention_mask, labels, pixel_values, lazy=lazy)
        stats = model.loss_fn(**inputs)
    return dense, stats


def every_text_label(model, input_ids, attention_mask, pixel_values):
    """Labels on every text token but a row's first (the first caption token
    after an image included), set to the image pass's greedy prediction so
    that p_img is large and the weights spread over the bounds."""
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == IMAGE_ID), IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    with torch.no_grad():
        greedy = model(input_ids, attention_mask, pixel_values=pixel_values,
                       mode='tensor').argmax(-1)
    labels[:, 1:] = torch.where(labels[:, 1:] != IGNORE_INDEX, greedy[:, :-1], labels[:, 1:])
    return labels


# --------------------------------------------------------------------------
# model.min_text_context
# --------------------------------------------------------------------------
def plain_row(caption=6, seed=3):
    """One plain align-template row: one text token (a BOS), the image, a caption."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(5, 175, (1 + caption, ), generator=g)
    input_ids = torch.cat([words[:1], torch.full((IMAGE_TOKENS, ), IMAGE_ID), words[1:]])[None]
    pixel_values = torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)
    return input_ids, torch.ones_like(input_ids), pixel_values


def text_probabilities(model, ids, positions, targets):
    """p(targets[i] | ids[:i + 1]) of a hand-built text-only row."""
    with torch.no_grad():
        logits = model.llm(input_ids=ids[None], position_ids=positions[None],
                           attention_mask=torch.ones_like(ids)[None], use_cache=False).logits[0]
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1).exp()


@pytest.mark.parametrize('name', sorted(PASSES))
def test_min_text_context_on_a_plain_row(name):
    """k=3 on `BOS <image> caption`: the first two caption tokens have fewer
    than three text tokens before them without the image and get delta_min;
    the later ones are scored from the text (a forward on BOS + caption with
    their position ids). k=1 scores them all from the text."""
    input_ids, attention_mask, pixel_values = plain_row()
    labels = every_text_label(build(), input_ids, attention_mask, pixel_values)
    caption = slice(IMAGE_TOKENS, None)  # the shifted targets of the caption
    text = torch.cat([input_ids[0, :1], input_ids[0, 1 + IMAGE_TOKENS:]])
    positions = torch.cat([torch.zeros(1, dtype=torch.long),
                           torch.arange(1 + IMAGE_TOKENS, input_ids.shape[1])])
    hand = text_probabilities(build(), text[:-1], positions[:-1], labels[0, 1 + IMAGE_TOKENS:])

    three, _ = scores(build(min_text_context=3), name, input_ids, attention_mask, labels,
                      pixel_values)
    score_img, score_txt = three['score_img'][0, caption], three['score_txt'][0, caption]
    assert torch.equal(score_txt[:2], score_img[:2])
    assert torch.all(three['weight'][0, caption][:2] == 0.05)
    torch.testing.assert_close(score_txt[2:], hand[2:], rtol=0, atol=1e-10)
    assert torch.all((score_txt[2:] - score_img[2:]).abs() > 1e-6)  # not the image's score

    one, _ = scores(build(min_text_context=1), name, input_ids, attention_mask, labels,
                    pixel_values)
    # The masked pass with k=1 is the reference's: it reads the first caption
    # token at the last image position (docs/fidelity.md).
    first = 1 if name == 'masked' else 0
    torch.testing.assert_close(one['score_txt'][0, caption][first:], hand[first:], rtol=0,
                               atol=1e-10)
    assert torch.all((one['score_txt'][0, caption] - one['score_img'][0, caption]).abs() > 1e-6)
    torch.testing.assert_close(one['score_img'], three['score_img'], rtol=0, atol=0)


def text_passes(model, input_ids, attention_mask, pixel_values):
    """``{pass: (logits, text_index)}`` of the removed and masked no-image passes."""
    results = {}
    with torch.no_grad():
        embeds, image_mask = model.embed(input_ids, pixel_values)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        for text_pass in ('removed', 'masked'):
            model.text_pass = text_pass
            outputs, text_index = model.text_only_outputs(embeds, attention_mask, position_ids,
                                                          image_mask)
            results[text_pass] = (model.split_llm.logits(outputs), text_index)
    return results, image_mask


@pytest.mark.parametrize('k', [1, 2, 3, 4, 6])
def test_min_text_context_keeps_the_targets_after_k_text_tokens(k):
    """text_index of both passes, written out: k=1 is today's removed pass
    (and the masked pass is the reference's, every position read); with k > 1
    a target keeps its row of the removed pass when at least k text tokens
    precede it, and the masked pass reads the same targets at the same
    tokens."""
    model = build(min_text_context=k, sharpen=False)
    input_ids, attention_mask, pixel_values = make_batch()
    batch, length = input_ids.shape
    results, image_mask = text_passes(model, input_ids, attention_mask, pixel_values)
    removed_logits, removed = results['removed']
    masked_logits, masked = results['masked']
    image_rows = [b for b, spec in enumerate(ROWS) if spec is not None]
    text_len = max(len(kept_positions(attention_mask, image_mask, b)) for b in image_rows)
    for b in range(batch):
        kept = kept_positions(attention_mask, image_mask, b)
        for j in range(length - 1):
            t = j + 1
            if b not in image_rows or t not in kept or kept.index(t) < k:
                assert removed[b, j] == -1, (b, j)
                if k > 1:
                    assert masked[b, j] == -1, (b, j)
                continue
            before = kept.index(t) - 1
            assert removed[b, j] == image_rows.index(b) * text_len + before, (b, j)
            if k > 1:
                assert masked[b, j] == b * (length - 1) + kept[before], (b, j)
                torch.testing.assert_close(masked_logits[masked[b, j]],
                                           removed_logits[removed[b, j]], rtol=0, atol=1e-10)
    if k == 1:
        assert torch.equal(masked.view(-1), torch.arange(batch * (length - 1)))
    counted = sum(max(0, before + after - k) for before, after in ROWS[:2])
    assert (removed >= 0).sum() == counted and counted > 0


# Rows of make_batch: 3 and 5 text tokens before the image, then 8 prompt
# tokens with the prompt. k=5 drops the first two caption tokens of the first
# row; k=12 with the prompt, its first one.
SWITCHES = [dict(min_text_context=5), dict(text_pass_prompt=PROMPT),
            dict(min_text_context=12, text_pass_prompt=PROMPT)]


@pytest.mark.parametrize('switches', SWITCHES, ids=['k5', 'prompt', 'k12_prompt'])
@pytest.mark.parametrize('model_type', ['llama', 'qwen2'])
def test_the_passes_agree_with_the_switches(model_type, switches):
    """The removed, masked and lazy passes give the same text scores, weights
    and loss with either switch, the first caption token after an image
    included; and the switch changes the result."""
    model = build(model_type, **switches)
    input_ids, attention_mask, pixel_values = make_batch()
    labels = every_text_label(model, input_ids, attention_mask, pixel_values)
    results = {name: scores(model, name, input_ids, attention_mask, labels, pixel_values)
               for name in PASSES}
    dense, stats = results['removed']
    for name in ('masked', 'lazy'):
        for key in ('score_txt', 'weight', 'clamped_delta'):
            torch.testing.assert_close(results[name][0][key], dense[key], rtol=0, atol=1e-10,
                                       msg=f'{name} {key}')
        for key in ('loss', 'cmo_w_mean', 'cmo_at_min', 'cmo_at_max', 'cmo_delta_mean'):
            assert abs(results[name][1][key].item() - stats[key].item()) < 1e-9, (name, key)
    assert 0 < stats['cmo_at_min'].item() < 1

    plain, _ = scores(build(model_type), 'removed', input_ids, attention_mask, labels,
                      pixel_values)
    supervised = labels[:, 1:] != IGNORE_INDEX
    changed = (plain['score_txt'] - dense['score_txt']).abs()[supervised] > 1e-6
    assert changed.any() and not changed.all()


# --------------------------------------------------------------------------
# model.text_pass_prompt
# --------------------------------------------------------------------------
@pytest.mark.parametrize('text_pass', ['removed', 'masked'])
@pytest.mark.parametrize('model_type', ['llama', 'qwen2'])
def test_prompt_is_scored_as_a_hand_built_row(model_type, text_pass):
    """With the prompt, each text target's no-image logits are those of a
    forward on [text before the image, prompt, text after] with the position
    ids of the original row (the prompt on the first image positions): the
    first target after the image is read at the last prompt token."""
    model = build(model_type, text_pass_prompt=PROMPT, sharpen=False)
    ids = torch.tensor(prompt_ids())
    assert 1 < len(ids) < IMAGE_TOKENS
    input_ids, attention_mask, pixel_values = make_batch()
    results, image_mask = text_passes(model, input_ids, attention_mask, pixel_values)
    logits, text_index = results[text_pass]
    unprompted, _ = text_passes(build(model_type, sharpen=False), input_ids, attention_mask,
                                pixel_values)
    for b, spec in enumerate(ROWS):
        if spec is None:
            assert torch.all(text_index[b] == -1)
            continue
        before, after = spec
        row = input_ids[b]
        hand_ids = torch.cat([row[:before], ids, row[before + IMAGE_TOKENS:][:after]])
        hand_positions = torch.cat([torch.arange(before + len(ids)),
                                    torch.arange(before + IMAGE_TOKENS,
                                                 before + IMAGE_TOKENS + after)])
        with torch.no_grad():
            hand = model.llm(input_ids=hand_ids[None], position_ids=hand_positions[None],
                             attention_mask=torch.ones_like(hand_ids)[None],
                             use_cache=False).logits[0]
        # Targets: the text after the first token, read at the token before
        # them in the hand-built row (the prompt's last for the first caption token).
        targets = list(range(1, before)) + list(range(before + IMAGE_TOKENS,
                                                      before + IMAGE_TOKENS + after))
        assert (text_index[b] >= 0).sum() == len(targets)
        for i, t in enumerate(targets):
            reader = i if t < before else before + len(ids) + (t - before - IMAGE_TOKENS) - 1
            torch.testing.assert_close(logits[text_index[b, t - 1]], hand[reader], rtol=0,
                                       atol=1e-10, msg=f'row {b} position {t}')
        first_caption = before + IMAGE_TOKENS - 1
        old_logits, old_index = unprompted[text_pass]
        # The prompt changes what the caption is scored after.
        assert (logits[text_index[b, first_caption]]
                - old_logits[old_index[b, first_caption]]).abs().max() > 1e-3


def test_switches_are_checked_when_the_model_is_built():
    for bad in (0, -1, True, 1.5, '2'):
        with pytest.raises(ValueError, match='model.min_text_context must be an integer'):
            build(min_text_context=bad, sharpen=False)
    for bad in ('', '  ', 3):
        with pytest.raises(ValueError, match='model.text_pass_prompt must be None'):
            build(text_pass_prompt=bad, sharpen=False)
    reference = dict(CMO, window=3, scope='reference')
    for switches in SWITCHES:
        with pytest.raises(ValueError, match='leave model.min_text_context=1'):
            LlavaDPAModel(llm=llm_cfg(), tokenizer=dict(type='TinyTokenizer'),
                          vision_tower=VISION_CFG, loss=reference, text_pass='masked',
                          **switches)
    # Longer than an image: refused before the LLM loads (none exists here).
    missing_llm = dict(type='HFCausalLM', pretrained='/nonexistent/llm')
    with pytest.raises(ValueError, match='is 20 tokens long, more than the 16 positions'):
        LlavaDPAModel(llm=missing_llm, tokenizer=dict(type='TinyTokenizer'),
                      vision_tower=VISION_CFG, loss=CMO, text_pass_prompt='z' * 20)


def test_a_row_shorter_than_the_prompt_is_refused_at_the_pass():
    """A batch whose image row holds fewer image positions than the prompt has
    tokens (here: a hand-made mask) is refused, not filled across rows."""
    model = build(text_pass_prompt=PROMPT, sharpen=False)
    input_ids, attention_mask, pixel_values = make_batch()
    with torch.no_grad():
        embeds, image_mask = model.embed(input_ids, pixel_values)
    image_mask[0, 3 + 4:3 + IMAGE_TOKENS] = False  # row 0: 4 image positions left
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    for text_pass in ('removed', 'masked'):
        model.text_pass = text_pass
        with pytest.raises(ValueError, match='only 4 image positions'):
            model.text_only_outputs(embeds, attention_mask, position_ids, image_mask)


def test_switches_are_checked_before_any_model_loads(tmp_path):
    cfg = tiny_config(tmp_path / 'work', tmp_path / 'data')
    check_cfg_options(cfg, {'model.min_text_context': 3, 'model.text_pass_prompt': PROMPT})
    with pytest.raises(ConfigError, match='the config has no `model.min_text_contxt`'):
        check_cfg_options(cfg, {'model.min_text_contxt': 3})
    cases = [({'model.min_text_context': 0}, 'must be an integer >= 1'),
             ({'model.text_pass_prompt': 'z' * 20}, 'more than the 16 positions'),
             ({'model.text_pass': 'masked', 'align.loss.scope': 'reference',
               'model.min_text_context': 2}, "align.loss.scope='reference' reproduces")]
    for options, message in cases:
        cfg = tiny_config(tmp_path / 'work', tmp_path / 'data', **options)
        with pytest.raises(ConfigError, match=message):
            resolve_config(cfg)
    resolve_config(tiny_config(tmp_path / 'work', tmp_path / 'data',
                               **{'model.min_text_context': 3,
                                  'model.text_pass_prompt': PROMPT}))
