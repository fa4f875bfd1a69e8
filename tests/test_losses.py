"""VisualRelevanceLoss, relevance_weights and target_scores against loop-based
restatements of the CMO/CAL formulas (DESIGN.md section 1)."""
import math

import pytest
import torch
import torch.nn.functional as F

import dpa.models.losses as losses
from dpa.models.losses import IGNORE_INDEX, VisualRelevanceLoss, relevance_weights, target_scores

EPS = 1e-6


# --------------------------------------------------------------------------
# Loop-based restatements (plain Python floats, no pooling/convolution ops)
# --------------------------------------------------------------------------
def clamp(x, lo, hi):
    return min(max(x, lo), hi)


def reference_weights_loop(s_img, s_txt, lo, hi, window):
    """fnlp-vision/DPA: clamp every position, flatten the batch to one row,
    average over the neighbours that exist (count_include_pad=False)."""
    batch, length = s_img.shape
    flat = [clamp(float(a) - float(b), lo, hi)
            for a, b in zip(s_img.reshape(-1).tolist(), s_txt.reshape(-1).tolist())]
    half, n = window // 2, len(flat)
    out = []
    for i in range(n):
        neighbours = [flat[j] for j in range(i - half, i + half + 1) if 0 <= j < n]
        out.append(sum(neighbours) / len(neighbours))
    return torch.tensor(out, dtype=torch.float64).view(batch, length)


def sequence_weights_loop(s_img, s_txt, supervised, lo, hi, window):
    """Clamp supervised positions; average each over the supervised positions
    of its own row within window // 2; unsupervised positions get 0."""
    batch, length = s_img.shape
    half = window // 2
    out = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        delta = {t: clamp(float(s_img[b, t]) - float(s_txt[b, t]), lo, hi)
                 for t in range(length) if supervised[b, t]}
        for i in delta:
            neighbours = [delta[j] for j in delta if abs(i - j) <= half]
            out[b, i] = sum(neighbours) / len(neighbours)
    return out


def random_case(batch, length, seed, p_supervised=0.7):
    g = torch.Generator().manual_seed(seed)
    s_img = torch.rand(batch, length, generator=g)
    s_txt = torch.rand(batch, length, generator=g)
    supervised = torch.rand(batch, length, generator=g) < p_supervised
    supervised[0, 0] = False  # at least one unsupervised position
    supervised[-1, -1] = True  # and at least one supervised one
    return s_img, s_txt, supervised


SHAPES = [(1, 1), (1, 7), (2, 5), (3, 11), (4, 2)]
CLAMPS = [(0.05, 0.5), (-0.3, 0.6), (0.0, 1.0)]


# --------------------------------------------------------------------------
# 1. scope='reference'
# --------------------------------------------------------------------------
@pytest.mark.parametrize('window', [1, 3, 5])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('bounds', CLAMPS)
def test_reference_scope_matches_loop(window, shape, bounds):
    s_img, s_txt, supervised = random_case(*shape, seed=100 * shape[0] + 10 * shape[1] + window)
    got = relevance_weights(s_img, s_txt, supervised, bounds, window, scope='reference')
    want = reference_weights_loop(s_img, s_txt, *bounds, window)
    assert got.shape == shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    # The reference ignores the supervision mask entirely.
    other = relevance_weights(s_img, s_txt, ~supervised, bounds, window, scope='reference')
    assert torch.equal(got, other)


def test_reference_scope_hand_example():
    s_img, s_txt, supervised = boundary_example()
    got = relevance_weights(s_img, s_txt, supervised, (0.05, 0.85), 3, scope='reference')
    # flat clamped deltas: 0.1 0.2 0.85 0.4 | 0.6 0.3 0.2 0.8
    want = torch.tensor([[0.3 / 2, 1.15 / 3, 1.45 / 3, 1.85 / 3],
                         [1.3 / 3, 1.1 / 3, 1.3 / 3, 1.0 / 2]], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------
# 2. scope='sequence'
# --------------------------------------------------------------------------
@pytest.mark.parametrize('window', [1, 3, 5])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('bounds', CLAMPS)
def test_sequence_scope_matches_loop(window, shape, bounds):
    s_img, s_txt, supervised = random_case(*shape, seed=100 * shape[0] + 10 * shape[1] + window + 1)
    got = relevance_weights(s_img, s_txt, supervised, bounds, window, scope='sequence')
    want = sequence_weights_loop(s_img, s_txt, supervised, *bounds, window)
    assert got.shape == shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    assert torch.all(got[~supervised] == 0)
    assert torch.all(got[supervised] >= bounds[0] - 1e-6)
    assert torch.all(got[supervised] <= bounds[1] + 1e-6)


def boundary_example():
    # deltas row 0: 0.1 0.2 0.9(ignored) 0.4 ; row 1: 0.6 0.3 0.2 0.8(ignored)
    s_txt = torch.zeros(2, 4)
    s_img = torch.tensor([[0.1, 0.2, 0.9, 0.4], [0.6, 0.3, 0.2, 0.8]])
    supervised = torch.tensor([[True, True, False, True], [True, True, True, False]])
    return s_img, s_txt, supervised


def test_scopes_differ_across_boundaries_and_ignored_positions():
    s_img, s_txt, supervised = boundary_example()
    seq = relevance_weights(s_img, s_txt, supervised, (0.05, 0.85), 3, scope='sequence')
    ref = relevance_weights(s_img, s_txt, supervised, (0.05, 0.85), 3, scope='reference')
    want_seq = torch.tensor([[0.15, 0.15, 0.0, 0.4],
                             [0.45, 1.1 / 3, 0.25, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(seq.double(), want_seq, atol=1e-6, rtol=0)
    # Row 0, last token: sequence sees only itself (its left neighbour is
    # ignored, its right one is in the next sample); the reference mixes in the
    # ignored 0.9 (clamped to 0.85) and row 1's first token.
    assert seq[0, 3].item() == pytest.approx(0.4, abs=1e-6)
    assert ref[0, 3].item() == pytest.approx((0.85 + 0.4 + 0.6) / 3, abs=1e-6)
    # Row 1, first token: the reference reaches back into row 0.
    assert seq[1, 0].item() == pytest.approx(0.45, abs=1e-6)
    assert ref[1, 0].item() == pytest.approx((0.4 + 0.6 + 0.3) / 3, abs=1e-6)


# --------------------------------------------------------------------------
# 3. Weights are constants
# --------------------------------------------------------------------------
@pytest.mark.parametrize('scope', ['sequence', 'reference'])
def test_weights_are_detached(scope):
    s_img, s_txt, supervised = random_case(2, 6, seed=3)
    s_img.requires_grad_(True)
    s_txt.requires_grad_(True)
    w = relevance_weights(s_img, s_txt, supervised, (0.05, 0.5), 3, scope)
    assert not w.requires_grad and w.grad_fn is None


def loss_case(seed, batch=3, length=9, vocab=7, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    targets[torch.rand(batch, length, generator=g) < 0.3] = IGNORE_INDEX
    targets[0, 0] = IGNORE_INDEX
    targets[-1, -1] = 1
    rows = 5
    text_logits = (scale * torch.randn(rows, vocab, generator=g)).to(dtype)
    text_index = torch.randint(-1, rows, (batch, length), generator=g)
    return logits, targets, text_logits, text_index


def dense_scores(logits, targets, text_logits, text_index, mode):
    """(B, T) image and text scores of every position, token 0 where ignored."""
    ids = targets.clamp(min=0)
    if mode == 'cal':
        s_img = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        all_txt = text_logits
    else:
        s_img = logits.softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        all_txt = text_logits.softmax(-1)
    s_txt = s_img.clone()
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if text_index[b, t] >= 0:
                s_txt[b, t] = all_txt[text_index[b, t], ids[b, t]]
    return s_img, s_txt


def weighted_ce(logits, targets, weights):
    vocab = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, vocab).float(), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction='none').view(targets.shape)
    supervised = targets != IGNORE_INDEX
    w = weights[supervised]
    return (w * ce[supervised]).sum() / (w.sum() + EPS)


@pytest.mark.parametrize('scope', ['sequence', 'reference'])
@pytest.mark.parametrize('mode', ['cmo', 'cal'])
def test_no_gradient_through_weights(scope, mode):
    logits, targets, text_logits, text_index = loss_case(seed=11)
    bounds = (0.05, 0.5) if mode == 'cmo' else (-1.0, 2.0)
    loss_fn = VisualRelevanceLoss(mode=mode, clamp=bounds, window=3, scope=scope)
    supervised = targets != IGNORE_INDEX

    logits_a = logits.clone().requires_grad_(True)
    out = loss_fn(logits_a, targets, text_logits, text_index)
    out['loss'].backward()

    # Frozen weights computed separately, with the loop restatements.
    s_img, s_txt = dense_scores(logits.double(), targets, text_logits.double(), text_index, mode)
    if scope == 'reference':
        w_const = reference_weights_loop(s_img, s_txt, *bounds, 3)
    else:
        w_const = sequence_weights_loop(s_img, s_txt, supervised, *bounds, 3)
    logits_b = logits.clone().requires_grad_(True)
    want = weighted_ce(logits_b, targets, w_const.float())
    want.backward()
    assert out['loss'].item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(logits_a.grad, logits_b.grad, atol=1e-6, rtol=1e-4)

    # Sensitivity: letting the gradient flow through the weights changes it.
    logits_c = logits.clone().requires_grad_(True)
    ids = targets.clamp(min=0)
    if mode == 'cal':
        live_img = logits_c.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    else:
        live_img = logits_c.softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    live_txt = torch.where(text_index >= 0, s_txt.float(), live_img)
    live_w = (live_img - live_txt).clamp(*bounds)
    if scope == 'reference':
        live_w = F.avg_pool1d(live_w.reshape(1, 1, -1), 3, 1, 1,
                              count_include_pad=False).view(targets.shape)
    else:
        mask = supervised.float()
        kernel = torch.ones(1, 1, 3)
        live_w = (F.conv1d((live_w * mask).unsqueeze(1), kernel, padding=1).squeeze(1)
                  / F.conv1d(mask.unsqueeze(1), kernel, padding=1).squeeze(1).clamp(min=1))
        live_w = live_w * mask
    torch.testing.assert_close(live_w.detach().double(), w_const, atol=1e-5, rtol=0)
    weighted_ce(logits_c, targets, live_w).backward()
    assert (logits_c.grad - logits_a.grad).abs().max() > 1e-3


# --------------------------------------------------------------------------
# 4. Constant weights give the vanilla loss
# --------------------------------------------------------------------------
@pytest.mark.parametrize('scope', ['sequence', 'reference'])
@pytest.mark.parametrize('mode,bounds', [('cmo', (0.3, 0.3)), ('cal', (2.0, 2.0))])
def test_degenerate_clamp_equals_vanilla(mode, bounds, scope):
    logits, targets, text_logits, text_index = loss_case(seed=5, batch=2, length=12, vocab=11)
    vocab = logits.shape[-1]
    vanilla = VisualRelevanceLoss(mode='vanilla')(logits, targets)['loss']
    torch_ce = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
    supervised = targets != IGNORE_INDEX
    by_hand = -sum(math.log(logits[b, t].softmax(-1)[targets[b, t]].item())
                   for b, t in supervised.nonzero().tolist()) / int(supervised.sum())
    assert vanilla.item() == pytest.approx(torch_ce.item(), rel=1e-6)
    assert vanilla.item() == pytest.approx(by_hand, rel=1e-6)

    out = VisualRelevanceLoss(mode=mode, clamp=bounds, scope=scope)(
        logits, targets, text_logits, text_index)
    assert out['loss'].item() == pytest.approx(vanilla.item(), rel=1e-6)
    assert out['cmo_w_mean'].item() == pytest.approx(bounds[0], rel=1e-6)


def test_vanilla_needs_no_text_pass():
    assert not VisualRelevanceLoss(mode='vanilla').needs_text_pass
    assert VisualRelevanceLoss(mode='cmo').needs_text_pass
    assert VisualRelevanceLoss(mode='cal').needs_text_pass
    assert VisualRelevanceLoss(mode='cmo').clamp == (0.05, 0.5)
    assert VisualRelevanceLoss(mode='cal').clamp == (1.0, 5.0)
    logits, targets, _, _ = loss_case(seed=2)
    with pytest.raises(ValueError, match='no-image pass'):
        VisualRelevanceLoss(mode='cmo')(logits, targets)


# --------------------------------------------------------------------------
# 5. Scores: log-probabilities and logits
# --------------------------------------------------------------------------
def test_target_scores_match_log_softmax_float64():
    g = torch.Generator().manual_seed(0)
    logits = 30 * torch.randn(64, 50, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (64, ), generator=g)
    logit, logp = target_scores(logits, targets)
    want_logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    want_logit = logits[torch.arange(64), targets]
    assert logit.dtype == logp.dtype == torch.float64  # float32 at least
    assert target_scores(logits.bfloat16(), targets)[1].dtype == torch.float32
    torch.testing.assert_close(logp, want_logp, atol=1e-12, rtol=0)
    torch.testing.assert_close(logit, want_logit, atol=0, rtol=0)
    assert torch.all(logp <= 0)


def test_target_scores_stable_for_huge_logits():
    # exp() of these overflows float32 and float64: a softmax-based score would be nan.
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [800.0, 800.0, 0.0]], dtype=torch.float64)
    assert not torch.isfinite(logits.exp()).all()
    _, logp = target_scores(logits, torch.tensor([0, 1]))
    assert torch.isfinite(logp).all()
    want = torch.tensor([0.0, -math.log(2)], dtype=torch.float64)
    torch.testing.assert_close(logp.double(), want, atol=1e-4, rtol=0)


class Spy:
    """Records the (score_img, score_txt) the loss hands to relevance_weights."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = losses.relevance_weights

        def spy(score_img, score_txt, *args, **kwargs):
            self.calls.append((score_img.clone(), score_txt.clone()))
            return real(score_img, score_txt, *args, **kwargs)

        monkeypatch.setattr(losses, 'relevance_weights', spy)


def single_token(img_logits, txt_logits, target=0):
    logits = torch.tensor([[img_logits, img_logits]])  # (1, 2, V); position 1 ignored
    targets = torch.tensor([[target, IGNORE_INDEX]])
    return logits, targets, torch.tensor([txt_logits]), torch.tensor([[0, -1]])


@pytest.mark.parametrize('case', ['logit_up_prob_down', 'prob_up_logit_flat'])
def test_cal_follows_logits_cmo_follows_probabilities(case, monkeypatch):
    if case == 'logit_up_prob_down':
        # logit of the target rises by 2 but its probability drops
        img, txt = [5.0, 0.0, 0.0, 0.0], [3.0, -10.0, -10.0, -10.0]
    else:
        # the probability rises by ~0.46 while the logit rises by 0.5
        img, txt = [2.0, 0.0, 0.0, 0.0], [1.5, 1.5, 1.5, 1.5]
    logits, targets, text_logits, text_index = single_token(img, txt)
    p_img = torch.tensor(img).softmax(-1)[0].item()
    p_txt = torch.tensor(txt).softmax(-1)[0].item()
    logit_delta = img[0] - txt[0]
    spy = Spy(monkeypatch)

    cal = VisualRelevanceLoss(mode='cal', clamp=(1.0, 5.0), window=1)(
        logits, targets, text_logits, text_index)
    cmo = VisualRelevanceLoss(mode='cmo', clamp=(0.05, 0.5), window=1)(
        logits, targets, text_logits, text_index)
    assert cal['cmo_delta_mean'].item() == pytest.approx(clamp(logit_delta, 1.0, 5.0), abs=1e-5)
    assert cal['cmo_w_mean'].item() == pytest.approx(clamp(logit_delta, 1.0, 5.0), abs=1e-6)
    assert cmo['cmo_delta_mean'].item() == pytest.approx(clamp(p_img - p_txt, 0.05, 0.5), abs=1e-6)
    assert cmo['cmo_w_mean'].item() == pytest.approx(clamp(p_img - p_txt, 0.05, 0.5), abs=1e-6)
    # The two modes weigh this token differently.
    assert abs(cal['cmo_w_mean'].item() - cmo['cmo_w_mean'].item()) > 0.3
    (cal_img, cal_txt), (cmo_img, cmo_txt) = spy.calls
    assert cal_img[0, 0].item() == pytest.approx(img[0])
    assert cal_txt[0, 0].item() == pytest.approx(txt[0])
    assert cmo_img[0, 0].item() == pytest.approx(p_img, abs=1e-6)
    assert cmo_txt[0, 0].item() == pytest.approx(p_txt, abs=1e-6)


# --------------------------------------------------------------------------
# 6. Invalid settings
# --------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs,key', [
    (dict(mode='cmo', clamp=(0.5, 0.05)), 'loss.clamp'),
    (dict(mode='cal', clamp=(5.0, 1.0)), 'loss.clamp'),
    (dict(mode='cmo', clamp=(0.05, )), 'loss.clamp'),
    (dict(mode='cmo', scope='batch'), 'loss.scope'),
    (dict(mode='dpa'), 'loss.mode'),
])
def test_invalid_loss_settings(kwargs, key):
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
        VisualRelevanceLoss(**kwargs)


@pytest.mark.parametrize('window', [0, 2, 4, -1])
def test_even_window_rejected_by_relevance_weights(window):
    s_img, s_txt, supervised = random_case(1, 4, seed=0)
    with pytest.raises(ValueError, match='window'):
        relevance_weights(s_img, s_txt, supervised, window=window)


def test_bad_scope_rejected_by_relevance_weights():
    s_img, s_txt, supervised = random_case(1, 4, seed=0)
    with pytest.raises(ValueError, match='scope'):
        relevance_weights(s_img, s_txt, supervised, scope='batch')


def test_even_window_fails_when_the_loss_runs():
    logits, targets, text_logits, text_index = loss_case(seed=1)
    with pytest.raises(ValueError, match='window'):
        VisualRelevanceLoss(mode='cmo', window=4)(logits, targets, text_logits, text_index)


def test_even_window_rejected_at_construction_naming_the_key():
    with pytest.raises(ValueError, match=r'loss\.window'):
        VisualRelevanceLoss(mode='cmo', window=4)


# --------------------------------------------------------------------------
# 7. Statistics by hand
# --------------------------------------------------------------------------
def test_statistics_by_hand():
    # One row, vocabulary of 2: logits log([p, 1-p]) give probability p exactly.
    p_img = [0.9, 0.5, 0.2, 0.8, 0.7]
    p_txt = [0.3, 0.49, 0.6, 0.6, 0.1]
    targets = torch.tensor([[0, 0, 0, 0, IGNORE_INDEX]])
    logits = torch.log(torch.tensor([[[p, 1 - p] for p in p_img]], dtype=torch.float64)).float()
    text_logits = torch.log(torch.tensor([[p, 1 - p] for p in p_txt], dtype=torch.float64)).float()
    text_index = torch.tensor([[0, 1, 2, 3, 4]])
    out = VisualRelevanceLoss(mode='cmo', clamp=(0.05, 0.5), window=3, scope='sequence')(
        logits, targets, text_logits, text_index)

    deltas = [0.6, 0.01, -0.4, 0.2]  # clamped: 0.5, 0.05, 0.05, 0.2 (one of each kind)
    weights = [(0.5 + 0.05) / 2, (0.5 + 0.05 + 0.05) / 3, (0.05 + 0.05 + 0.2) / 3, (0.05 + 0.2) / 2]
    ce = [-math.log(p) for p in p_img[:4]]
    loss = sum(w * c for w, c in zip(weights, ce)) / (sum(weights) + EPS)
    assert out['loss'].item() == pytest.approx(loss, rel=1e-5)
    assert out['cmo_w_mean'].item() == pytest.approx(sum(weights) / 4, abs=1e-6)
    assert out['cmo_at_min'].item() == pytest.approx(2 / 4, abs=1e-6)
    assert out['cmo_at_max'].item() == pytest.approx(1 / 4, abs=1e-6)
    clamped = [0.5, 0.05, 0.05, 0.2]
    assert out['cmo_delta_mean'].item() == pytest.approx(sum(clamped) / 4, abs=1e-6)
    scores = VisualRelevanceLoss(mode='cmo', clamp=(0.05, 0.5)).token_scores(
        logits, targets, text_logits, text_index, score_all_text=True)
    assert scores['delta'][0, :4].tolist() == pytest.approx(deltas, abs=1e-6)
    for key in ('cmo_w_mean', 'cmo_at_min', 'cmo_at_max', 'cmo_delta_mean'):
        assert 'loss' not in key and not out[key].requires_grad


@pytest.mark.parametrize('scope', losses.SCOPES)
def test_cmo_text_scores_only_where_the_image_score_is_above_the_floor(scope):
    """A target with p_img <= delta_min gets delta_min whatever p_txt is: CMO
    skips its text score, and the weights, statistics and loss stay exact."""
    logits, targets, text_logits, text_index = loss_case(seed=5, batch=3, length=12, vocab=40,
                                                         scale=3.0)
    rows = []

    def counting(outputs, ids):
        rows.append(outputs.shape[0])
        return target_scores(outputs, ids)

    loss = VisualRelevanceLoss(mode='cmo', clamp=(0.05, 0.5), scope=scope)
    full = loss.token_scores(logits, targets, text_logits, text_index, counting,
                             score_all_text=True)
    fast = loss.token_scores(logits, targets, text_logits, text_index, counting)
    scored = targets.clamp(min=0) >= 0 if scope == 'reference' else targets != IGNORE_INDEX
    floor = scored & (text_index >= 0) & (full['score_img'] <= 0.05)
    assert 0 < floor.sum() < (scored & (text_index >= 0)).sum()  # a mix of both kinds
    assert rows[3] == rows[1] - int(floor.sum())  # text calls: all, then the needed ones
    assert torch.equal(fast['weight'], full['weight'])
    assert torch.equal(fast['clamped_delta'][scored], full['clamped_delta'][scored])
    assert torch.isnan(fast['score_txt'][floor]).all()
    assert torch.equal(fast['score_txt'][~floor], full['score_txt'][~floor])
    # The loss and its statistics come from the same weights.
    out = loss(logits, targets, text_logits, text_index)
    w = full['weight'][targets != IGNORE_INDEX]
    want = (w * -full['logp']).sum() / (w.sum() + EPS)
    torch.testing.assert_close(out['loss'], want, rtol=0, atol=0)
    supervised = targets != IGNORE_INDEX
    assert out['cmo_delta_mean'].item() == pytest.approx(
        float(full['delta'][supervised].clamp(0.05, 0.5).mean()), abs=1e-7)


# --------------------------------------------------------------------------
# 8. No text-only evidence
# --------------------------------------------------------------------------
@pytest.mark.parametrize('mode,bounds', [('cmo', (0.05, 0.5)), ('cal', (1.0, 5.0))])
def test_missing_text_evidence_gives_delta_min(mode, bounds, monkeypatch):
    logits, targets, text_logits, text_index = loss_case(seed=7, batch=2, length=8)
    text_index[0] = -1  # row 0: no image, or no text prefix
    text_index[1] = torch.arange(8) % text_logits.shape[0]
    supervised = targets != IGNORE_INDEX
    spy = Spy(monkeypatch)
    VisualRelevanceLoss(mode=mode, clamp=bounds, window=3)(logits, targets, text_logits, text_index)
    (s_img, s_txt), = spy.calls
    assert torch.equal(s_txt[0], s_img[0])
    assert torch.all(relevance_weights(s_img, s_txt, supervised, bounds, 1)[0][supervised[0]]
                     == bounds[0])
    # The other row reads the text pass (CMO: where p_img > delta_min, the
    # others get delta_min whatever p_txt is, and are not scored).
    _, want_txt = dense_scores(logits.double(), targets, text_logits.double(), text_index, mode)
    read = supervised[1] & ((s_img[1] > bounds[0]) if mode == 'cmo' else True)
    assert 0 < read.sum() and (mode == 'cal' or read.sum() < supervised[1].sum())
    torch.testing.assert_close(s_txt[1][read].double(), want_txt[1][read], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s_txt[1][read], s_img[1][read])
    assert torch.equal(s_txt[1][supervised[1] & ~read], s_img[1][supervised[1] & ~read])

    # With no evidence anywhere every weight is delta_min, smoothed or not.
    out = VisualRelevanceLoss(mode=mode, clamp=bounds, window=3)(
        logits, targets, text_logits, torch.full_like(text_index, -1))
    assert out['cmo_w_mean'].item() == pytest.approx(bounds[0], abs=1e-7)
    assert out['cmo_at_min'].item() == 1.0 and out['cmo_at_max'].item() == 0.0
    assert out['cmo_delta_mean'].item() == pytest.approx(bounds[0], abs=1e-7)
