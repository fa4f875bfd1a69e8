"""Target-token scores read from an LLM's last hidden states, chunk by chunk.

A causal LM's loss needs, per supervised position, only the target's logit and
its log-probability ``logit[y] - logsumexp(logits)``. :class:`SplitCausalLM`
runs the LLM as decoder + LM head: the decoder gives hidden states, and the
head is applied only to the rows the loss reads, ``chunk_size`` rows at a
time, so neither the training pass nor the no-image pass materialises
(batch x length x vocab) logits. The gradient with respect to the hidden
states is computed chunk by chunk while the forward runs; the head's own
weights, when they train, get theirs by recomputing each chunk in backward.
"""
from typing import Callable, Optional, Tuple

import torch
from mmengine.logging import print_log
from torch import nn

from dpa.models.losses import target_scores

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
PROBE_TOKENS = 8


def logit_postprocess(config) -> Optional[LogitsFn]:
    """What a family's ``ForCausalLM.forward`` does to the LM head's output,
    read from its config: Gemma-2/3 soft-capping, Cohere's ``logit_scale``,
    Granite's ``logits_scaling``. None when the logits are the head's output."""
    config = config.get_text_config()
    cap = getattr(config, 'final_logit_softcapping', None)
    if cap is not None:
        # The same operations, in the same order, as the HF forward.
        return lambda logits: torch.tanh(logits / cap) * cap
    if config.model_type.startswith('cohere') and getattr(config, 'logit_scale', None):
        scale = config.logit_scale
        return lambda logits: logits * scale
    if getattr(config, 'logits_scaling', None):
        scaling = config.logits_scaling
        return lambda logits: logits / scaling
    return None


class _ChunkedTargetScores(torch.autograd.Function):
    """(target logit, target log-probability) of each row of ``hidden``.

    Every row is scored independently, so the gradient of the sum of the
    log-probabilities with respect to a chunk is each row's own gradient: it is
    kept (rows x hidden size) and scaled by the incoming gradient in backward.
    The target logit only feeds constant weights and has no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, targets, logits_fn, chunk_size, *head_params):
        needs_hidden_grad = ctx.needs_input_grad[0]
        ctx.needs_param_grad = any(ctx.needs_input_grad[4:])
        target_logits, logps, hidden_grads = [], [], []
        for start in _chunk_starts(hidden.shape[0], chunk_size):
            rows = hidden[start:start + chunk_size].detach().requires_grad_(needs_hidden_grad)
            with torch.set_grad_enabled(needs_hidden_grad):
                target_logit, logp = _scores(logits_fn, rows, targets[start:start + chunk_size])
                if needs_hidden_grad:
                    hidden_grads.append(torch.autograd.grad(logp.sum(), rows)[0])
            target_logits.append(target_logit.detach())
            logps.append(logp.detach())
        ctx.logits_fn, ctx.chunk_size, ctx.head_params = logits_fn, chunk_size, head_params
        # Backward recomputes the logits under the forward's autocast (bf16 training).
        device = hidden.device.type
        ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                            dtype=torch.get_autocast_dtype(device))
        hidden_grad = torch.cat(hidden_grads) if needs_hidden_grad else None
        ctx.save_for_backward(hidden if ctx.needs_param_grad else None, targets, hidden_grad)
        target_logit = torch.cat(target_logits)
        ctx.mark_non_differentiable(target_logit)
        return target_logit, torch.cat(logps)

    @staticmethod
    def backward(ctx, _, grad_logp):
        hidden, targets, hidden_grad = ctx.saved_tensors
        grad_hidden = None
        if hidden_grad is not None:
            grad_hidden = hidden_grad * grad_logp.unsqueeze(-1).to(hidden_grad.dtype)
        grad_params = [None] * len(ctx.head_params)
        if ctx.needs_param_grad:
            trained = [i for i, p in enumerate(ctx.head_params) if p.requires_grad]
            for start in _chunk_starts(hidden.shape[0], ctx.chunk_size):
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    _, logp = _scores(ctx.logits_fn, hidden[start:start + ctx.chunk_size].detach(),
                                      targets[start:start + ctx.chunk_size])
                    grads = torch.autograd.grad(
                        logp, [ctx.head_params[i] for i in trained],
                        grad_outputs=grad_logp[start:start + ctx.chunk_size])
                for i, grad in zip(trained, grads):
                    grad_params[i] = grad if grad_params[i] is None else grad_params[i] + grad
        return (grad_hidden, None, None, None, *grad_params)


def _chunk_starts(rows: int, chunk_size: int) -> range:
    # At least one chunk: no rows give empty scores of the right dtype.
    return range(0, max(rows, 1), chunk_size)


def _scores(logits_fn: LogitsFn, hidden: torch.Tensor, targets: torch.Tensor):
    return target_scores(logits_fn(hidden), targets)


def chunked_target_scores(hidden: torch.Tensor,
                          targets: torch.Tensor,
                          lm_head: nn.Module,
                          postprocess: Optional[LogitsFn] = None,
                          chunk_size: int = 512) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logit and log-probability of each row's target token (float32, or
    float64 for a float64 head), without materialising more than
    ``chunk_size`` rows of logits.

    Equal to :func:`dpa.models.losses.target_scores` on
    ``postprocess(lm_head(hidden))``, gradients included (the logit has none).

    Args:
        hidden: (N, H) last hidden states of the positions to score.
        targets: (N,) token ids.
        lm_head: the LLM's output embedding module (any module: a LoRA-wrapped
            head works too).
        postprocess: applied to the head's output, see :func:`logit_postprocess`.
        chunk_size: rows of logits computed at once.
    """
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be positive, got {chunk_size}')

    def logits_fn(rows):
        logits = lm_head(rows)
        return logits if postprocess is None else postprocess(logits)

    params = list(lm_head.parameters())
    if torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params)):
        return _ChunkedTargetScores.apply(hidden, targets, logits_fn, chunk_size, *params)
    with torch.no_grad():
        scores = [_scores(logits_fn, hidden[start:start + chunk_size],
                          targets[start:start + chunk_size])
                  for start in _chunk_starts(hidden.shape[0], chunk_size)]
    return tuple(torch.cat(parts) for parts in zip(*scores))


def check_chunk_size(chunk_size: Optional[int]) -> None:
    """Raise a ValueError naming ``model.loss_chunk_size`` unless it is a
    positive integer or None."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f'model.loss_chunk_size must be a positive integer or None, '
                         f'got {chunk_size!r}')


class SplitCausalLM:
    """A Hugging Face causal LM run as decoder + LM head.

    Not an ``nn.Module``: it only points at the LLM's own decoder and head, so
    the model's state dict and devices stay the LLM's.

    Args:
        llm: the causal LM (a PEFT model works: its LoRA layers sit inside).
        chunk_size: rows of logits computed at once by :meth:`target_scores`.
    """

    def __init__(self, llm: nn.Module, chunk_size: int):
        check_chunk_size(chunk_size)
        self.decoder = llm.get_decoder()
        self.lm_head = llm.get_output_embeddings()
        if self.decoder is None or self.decoder is llm or self.lm_head is None:
            raise NotImplementedError('the LLM does not expose a separate decoder and LM head '
                                      '(get_decoder / get_output_embeddings)')
        self.postprocess = logit_postprocess(llm.config)
        self.chunk_size = chunk_size

    @classmethod
    def try_split(cls, llm: nn.Module, chunk_size: Optional[int]) -> Optional['SplitCausalLM']:
        """The split LLM, or None when ``chunk_size`` is None or the LLM cannot
        be split faithfully; the caller then uses the LLM's own forward."""
        if chunk_size is None:
            return None
        try:
            split = cls(llm, chunk_size)
            split.check_against(llm)
        except (NotImplementedError, AttributeError, TypeError, RuntimeError) as err:
            print_log(f'chunked loss disabled, the LLM computes full logits: {err}',
                      logger='current')
            return None
        return split

    def check_against(self, llm: nn.Module) -> None:
        """Raise NotImplementedError unless decoder + head give the LLM's own
        logits on a probe input.

        Catches a family whose forward post-processes its logits in a way
        :func:`logit_postprocess` does not know (remote code, for instance).
        """
        vocab = llm.get_input_embeddings().num_embeddings
        device = next(llm.parameters()).device
        input_ids = (torch.arange(PROBE_TOKENS, device=device) * 7919 % vocab).unsqueeze(0)
        training = llm.training
        llm.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                want = llm(input_ids=input_ids, use_cache=False).logits.float()
                hidden = self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state
                got = self.logits(hidden).float()
        finally:
            llm.train(training)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-5):
            raise NotImplementedError("decoder + LM head do not reproduce the LLM's logits (its "
                                      'forward post-processes them in a way not known here)')

    def hidden_states(self, embeds, attention_mask, position_ids) -> torch.Tensor:
        return self.decoder(inputs_embeds=embeds, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return logits if self.postprocess is None else self.postprocess(logits)

    def target_scores(self, hidden: torch.Tensor, targets: torch.Tensor):
        """See :func:`chunked_target_scores`."""
        return chunked_target_scores(hidden, targets, self.lm_head, self.postprocess,
                                     self.chunk_size)
