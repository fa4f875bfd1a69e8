"""Token-weighted language-modelling losses: vanilla CE, CAL and CMO.

CMO (Contrastive Modality Optimization, DPA) and CAL weight every supervised
token by how much the image raises its score: ``w = clamp(s_img - s_txt)``,
smoothed over neighbouring tokens, where the score ``s`` is the target token's
probability (CMO) or logit (CAL). ``s_txt`` comes from a pass of the same LLM
without the image tokens. The weights are constants: no gradient flows
through them.
"""
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from dpa.registry import MODELS

IGNORE_INDEX = -100
SCOPES = ('sequence', 'reference')
DEFAULT_CLAMP = {'cmo': (0.05, 0.5), 'cal': (1.0, 5.0)}
ScoreFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def relevance_weights(score_img: torch.Tensor,
                      score_txt: torch.Tensor,
                      supervised: torch.Tensor,
                      clamp: Tuple[float, float] = (0.05, 0.5),
                      window: int = 3,
                      scope: str = 'sequence') -> torch.Tensor:
    """Per-token weights ``clamp(score_img - score_txt)`` smoothed by a moving
    average of width ``window``.

    Args:
        score_img: (B, T) scores of the target tokens with the image.
        score_txt: (B, T) scores of the same targets without the image.
        supervised: (B, T) bool, True where a target is trained on.
        clamp: (delta_min, delta_max).
        window: odd width of the moving average; 1 disables smoothing.
        scope: ``'sequence'`` clamps supervised positions only and averages
            each with the supervised positions of its own row within
            ``window // 2``; unsupervised positions get 0. ``'reference'``
            reproduces fnlp-vision/DPA: clamp every position, then average
            over the batch flattened to one row (windows cross sample
            boundaries and include ignored positions), padding ``window // 2``
            with ``count_include_pad=False``.

    Returns:
        (B, T) detached float32 weights.
    """
    if scope not in SCOPES:
        raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
    if window < 1 or window % 2 == 0:
        raise ValueError(f'window must be a positive odd integer, got {window}')
    delta_min, delta_max = clamp
    with torch.no_grad():
        delta = (score_img.float() - score_txt.float()).clamp(delta_min, delta_max)
        pad = window // 2
        if scope == 'reference':
            flat = delta.reshape(1, 1, -1)
            smoothed = F.avg_pool1d(flat, window, stride=1, padding=pad,
                                    count_include_pad=False)
            return smoothed.reshape(delta.shape)
        mask = supervised.float()
        kernel = torch.ones(1, 1, window, dtype=delta.dtype, device=delta.device)
        total = F.conv1d((delta * mask).unsqueeze(1), kernel, padding=pad).squeeze(1)
        count = F.conv1d(mask.unsqueeze(1), kernel, padding=pad).squeeze(1)
        return torch.where(supervised, total / count.clamp(min=1.0), torch.zeros_like(delta))


def target_scores(logits: torch.Tensor,
                  targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logit and log-probability of each row's target token, in float32 (in
    float64 for float64 logits).

    ``log p = logit[y] - logsumexp(logits)``: no probability tensor over the
    vocabulary is built.

    Args:
        logits: (N, V) logits.
        targets: (N,) token ids.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return target_logit, target_logit - torch.logsumexp(logits, dim=-1)


@MODELS.register_module()
class VisualRelevanceLoss(nn.Module):
    """Causal-LM loss with per-token visual-relevance weights.

    Args:
        mode: ``'vanilla'`` (mean CE), ``'cmo'`` (probability scores, DPA) or
            ``'cal'`` (logit scores, Xiao et al. 2024).
        clamp: (delta_min, delta_max); defaults to (0.05, 0.5) for CMO and
            (1, 5) for CAL.
        window: moving-average width of the weights.
        scope: see :func:`relevance_weights`.
        eps: added to the sum of weights in the normaliser.
    """

    def __init__(self,
                 mode: str = 'cmo',
                 clamp: Optional[Tuple[float, float]] = None,
                 window: int = 3,
                 scope: str = 'sequence',
                 eps: float = 1e-6):
        super().__init__()
        if mode not in ('vanilla', 'cmo', 'cal'):
            raise ValueError(f"loss.mode must be 'vanilla', 'cmo' or 'cal', got {mode!r}")
        clamp = tuple(clamp) if clamp is not None else DEFAULT_CLAMP.get(mode)
        if mode != 'vanilla':
            check_clamp(clamp, key='loss.clamp')
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f'loss.window must be a positive odd integer, got {window!r}')
        if scope not in SCOPES:
            raise ValueError(f'loss.scope must be one of {SCOPES}, got {scope!r}')
        self.mode, self.clamp, self.window, self.scope, self.eps = mode, clamp, window, scope, eps
        # Set by the model (see dpa.models.token_classes): the statistics are
        # then also split into content and template tokens.
        self.register_buffer('content_tokens', None, persistent=False)
        # The weights of the last batch, for the weight histogram in TensorBoard.
        self.last_weights = None
        # Score the text pass for every target, also those whose weight is
        # delta_min whatever it gives (see token_scores): same loss, slower;
        # the benchmark's worst case.
        self.score_all_text = False

    @property
    def needs_text_pass(self) -> bool:
        return self.mode != 'vanilla'

    @property
    def skips_floor_targets(self) -> bool:
        """Whether the no-image score of a target whose image probability is
        at most ``delta_min`` goes unused (CMO with ``delta_min >= 0``): the
        model then runs that pass after the image scores, for the other
        targets only (:meth:`dpa.models.LlavaDPAModel.loss_inputs`, ``lazy``)."""
        return self.mode == 'cmo' and self.clamp[0] >= 0 and not self.score_all_text

    def forward(self,
                outputs: torch.Tensor,
                targets: torch.Tensor,
                text_outputs: Optional[torch.Tensor] = None,
                text_index: Optional[torch.Tensor] = None,
                score_fn: ScoreFn = target_scores,
                text_pass: Optional[Callable] = None) -> dict:
        """Compute the loss and its statistics.

        Args:
            outputs: (B, T, F) what the LLM gives per position, read by
                ``score_fn``: logits by default, or last hidden states with the
                score function of a split LLM
                (:meth:`dpa.models.chunked_loss.SplitCausalLM.target_scores`).
                ``outputs[:, t]`` predicts ``targets[:, t]``.
            targets: (B, T) target ids, ``IGNORE_INDEX`` where unsupervised.
            text_outputs: (M, F) outputs of the pass without image tokens.
            text_index: (B, T) row of ``text_outputs`` that predicts
                ``targets[b, t]`` without the image, or -1 where there is no
                such evidence (rows without an image, no text prefix): there
                the image score is used, so the token gets ``delta_min``.
            score_fn: maps (N, F) outputs and (N,) targets to the targets'
                logits and log-probabilities, as :func:`target_scores` does.
            text_pass: instead of ``text_outputs`` and ``text_index``, the
                no-image pass to run once the image scores are known: called
                with the (B, T) targets whose text score is wanted, it
                returns ``(text_outputs, text_index, available)``, the last
                (B, T) True where the pass has evidence for a target, scored
                or not (see :meth:`dpa.models.LlavaDPAModel.loss_inputs`).

        Returns:
            dict with ``loss`` and, for weighted modes, ``cmo_w_mean``,
            ``cmo_at_min``, ``cmo_at_max``, ``cmo_delta_mean`` (of the clamped
            delta, the weight before smoothing; names without
            'loss' so mmengine logs and does not sum them) and, with
            ``content_tokens`` set, ``cmo_{w,delta}_mean_{content,template}``.
        """
        supervised = targets != IGNORE_INDEX
        if self.mode == 'vanilla':
            with record_function('dpa.scores.image'):
                _, logp = score_fn(outputs[supervised], targets[supervised])
            return {'loss': -logp.mean()}
        scores = self.token_scores(outputs, targets, text_outputs, text_index, score_fn,
                                   self.score_all_text, text_pass)
        with record_function('dpa.weights'):
            return self._weighted_loss(scores, targets, supervised)

    def _weighted_loss(self, scores: dict, targets, supervised) -> dict:
        w = scores['weight'][supervised]
        loss = (w * -scores['logp']).sum() / (w.sum() + self.eps)
        delta = scores['clamped_delta'][supervised]
        delta_min, delta_max = self.clamp
        self.last_weights = w.detach()
        stats = {
            'loss': loss,
            'cmo_w_mean': w.mean().detach(),
            'cmo_at_min': (delta <= delta_min).float().mean(),
            'cmo_at_max': (delta >= delta_max).float().mean(),
            'cmo_delta_mean': delta.mean(),
        }
        if self.content_tokens is not None:
            stats.update(self._class_stats(targets[supervised], w.detach(), delta))
        return stats

    def _class_stats(self, targets, weights, delta) -> dict:
        """Mean weight and delta of content and of template tokens (a class
        absent from the batch has no entry: no NaN in the logs)."""
        content = self.content_tokens[targets.clamp(max=self.content_tokens.numel() - 1)]
        stats = {}
        for name, members in (('content', content), ('template', ~content)):
            if members.any():
                stats[f'cmo_w_mean_{name}'] = weights[members].mean()
                stats[f'cmo_delta_mean_{name}'] = delta[members].mean()
        return stats

    def token_scores(self,
                     outputs: torch.Tensor,
                     targets: torch.Tensor,
                     text_outputs: torch.Tensor,
                     text_index: torch.Tensor,
                     score_fn: ScoreFn = target_scores,
                     score_all_text: bool = False,
                     text_pass: Optional[Callable] = None) -> dict:
        """What the weighted loss computes per target token (arguments as in
        :meth:`forward`; the mode must not be vanilla).

        In CMO a target whose image probability is at most ``delta_min`` gets
        ``delta_min`` whatever its text probability (``p_txt >= 0``), so its
        text score is not computed (one LM-head row over the vocabulary
        saved per such target) unless ``score_all_text``.

        Returns:
            dict with ``score_img``, ``score_txt`` (NaN where not computed),
            ``delta`` (their difference, unclamped), ``clamped_delta`` (exact
            everywhere), ``weight`` (clamped and smoothed, exactly what the
            loss multiplies by), all dense (B, T) and detached, and ``logp``:
            the log-probabilities of the supervised targets, in
            ``targets != IGNORE_INDEX`` order, with gradient.
        """
        if text_pass is None and (text_outputs is None or text_index is None):
            raise ValueError(f'loss.mode={self.mode!r} needs the no-image pass outputs')
        supervised = targets != IGNORE_INDEX
        # The reference scores every position (ignored ones with token id 0).
        scored = torch.ones_like(supervised) if self.scope == 'reference' else supervised
        score_targets = targets.clamp(min=0)[scored]
        with record_function('dpa.scores.image'):
            target_logit, logp = score_fn(outputs[scored], score_targets)
        score_img = target_logit if self.mode == 'cal' else logp.exp()

        above_floor = None
        if self.mode == 'cmo' and self.clamp[0] >= 0 and not score_all_text:
            above_floor = score_img.detach() > self.clamp[0]
        if text_pass is not None:
            wanted = torch.zeros_like(supervised)
            wanted[scored] = True if above_floor is None else above_floor
            text_outputs, text_index, available = text_pass(wanted)
            available = available[scored]
        else:
            available = text_index[scored] >= 0
        index = text_index[scored]
        has_text = available
        # Without text evidence the image score stands in (delta 0, then clamped).
        needed = has_text & (index >= 0)
        if above_floor is not None:
            needed = needed & above_floor
        with torch.no_grad(), record_function('dpa.scores.text'):
            # Called even with no row: sharded heads gather on every rank alike.
            txt_logit, txt_logp = score_fn(text_outputs[index[needed]], score_targets[needed])
        score_txt = score_img.detach().clone()
        score_txt[needed] = txt_logit if self.mode == 'cal' else txt_logp.exp()

        with record_function('dpa.weights'):
            return self._dense_scores(score_img, score_txt, logp, targets, scored, supervised,
                                      skipped=has_text & ~needed)

    def _dense_scores(self, score_img, score_txt, logp, targets, scored, supervised,
                      skipped) -> dict:
        dense_img = score_img.new_zeros(targets.shape)
        dense_txt = torch.zeros_like(dense_img)
        dense_img[scored] = score_img.detach()
        dense_txt[scored] = score_txt
        weights = relevance_weights(dense_img, dense_txt, supervised, self.clamp,
                                    self.window, self.scope)
        clamped = (dense_img - dense_txt).clamp(*self.clamp)
        unknown = torch.zeros_like(supervised)
        unknown[scored] = skipped
        dense_txt[unknown] = float('nan')
        return dict(score_img=dense_img, score_txt=dense_txt, delta=dense_img - dense_txt,
                    clamped_delta=clamped, weight=weights, logp=logp[supervised[scored]])


def check_clamp(clamp, key: str) -> None:
    """Raise a ValueError naming ``key`` unless clamp is (low, high), low <= high."""
    if clamp is None or len(clamp) != 2:
        raise ValueError(f'{key} must be a pair (delta_min, delta_max), got {clamp!r}')
    for bound in clamp:
        # A string compares with a string, and NaN with nothing: both would
        # pass the order check below and fail (or poison the loss) in training.
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or \
                not math.isfinite(bound):
            raise ValueError(f'{key}={tuple(clamp)!r}: both bounds must be finite numbers, '
                             f'got {bound!r}; e.g. {key}=(0.05, 0.5) (CMO) or (1, 5) (CAL)')
    if clamp[0] > clamp[1]:
        raise ValueError(f'{key}: delta_min={clamp[0]} is greater than delta_max={clamp[1]}; '
                         'swap them so that delta_min <= delta_max')
