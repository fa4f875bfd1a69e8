"""The chunked loss (LM head applied to the scored hidden states, chunk by
chunk) against the full-logits computation: scores, losses and gradients in
float64, post-processed logits, the fallback for LLMs that cannot be split, and
that no (batch x length x vocab) tensor is made."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaForCausalLM

import dpa  # noqa: F401
from dpa.models import LlavaDPAModel
from dpa.models.chunked_loss import SplitCausalLM, chunked_target_scores, logit_postprocess
from dpa.models.losses import IGNORE_INDEX, target_scores
from dpa.registry import MODELS
from test_model_equivalence import (IMAGE_ID, VISION_CFG, build_model, llm_cfg, make_batch,
                                    supervised_labels)

VOCAB, HIDDEN = 40, 6


def head_case(seed=0, rows=11, bias=True):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(HIDDEN, VOCAB, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=g, dtype=torch.float64))
    hidden = 2 * torch.randn(rows, HIDDEN, generator=g, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (rows, ), generator=g)
    upstream = torch.rand(rows, generator=g, dtype=torch.float64)  # weights of a weighted CE
    return head, hidden, targets, upstream


def softcap(logits):
    return torch.tanh(logits / 3.0) * 3.0


@pytest.mark.parametrize('postprocess', [None, softcap])
@pytest.mark.parametrize('train_head', [False, True])
@pytest.mark.parametrize('chunk_size', [1, 4, 11, 64])
def test_chunked_scores_and_gradients_equal_full_logits(chunk_size, train_head, postprocess):
    head, hidden, targets, upstream = head_case()
    head.requires_grad_(train_head)

    def run(score):
        x = hidden.clone().requires_grad_(True)
        head.zero_grad()
        logit, logp = score(x)
        (upstream * logp).sum().backward()
        grads = [x.grad] + [p.grad for p in head.parameters()]
        return logit.detach(), logp.detach(), grads

    def full(x):
        logits = head(x)
        return target_scores(logits if postprocess is None else postprocess(logits), targets)

    want = run(full)
    got = run(lambda x: chunked_target_scores(x, targets, head, postprocess, chunk_size))
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=0)
    assert not got[0].requires_grad or got[0].grad_fn is None
    for got_grad, want_grad in zip(got[2], want[2]):
        if want_grad is None:
            assert got_grad is None
        else:
            torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-10)
    assert (got[2][1] is not None) == train_head


def test_backward_recomputes_under_the_forward_autocast():
    head, hidden, targets, upstream = head_case(bias=False)
    head.float()
    grads = []
    for score in (lambda x: target_scores(head(x), targets),
                  lambda x: chunked_target_scores(x, targets, head, chunk_size=64)):
        head.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            _, logp = score(hidden.float())
        (upstream.float() * logp).sum().backward()
        grads.append(head.weight.grad.clone())
    # The same bf16 logits in backward as in forward: the same gradient.
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_chunked_scores_without_gradient_and_without_rows():
    head, hidden, targets, _ = head_case()
    with torch.no_grad():
        logit, logp = chunked_target_scores(hidden, targets, head, chunk_size=3)
    want_logit, want_logp = target_scores(head(hidden), targets)
    torch.testing.assert_close(logp, want_logp)
    torch.testing.assert_close(logit, want_logit)
    logit, logp = chunked_target_scores(hidden[:0], targets[:0], head, chunk_size=3)
    assert logit.shape == logp.shape == (0, )
    with pytest.raises(ValueError, match='chunk_size'):
        chunked_target_scores(hidden, targets, head, chunk_size=0)


# --------------------------------------------------------------------------
# The model: chunked loss == full-logits loss, gradients included
# --------------------------------------------------------------------------
def labelled_batch(model):
    input_ids, attention_mask, pixel_values = make_batch()
    labels = torch.where(attention_mask.bool() & (input_ids != IMAGE_ID), input_ids,
                         torch.full_like(input_ids, IGNORE_INDEX))
    labels[:, :2] = IGNORE_INDEX
    return input_ids, attention_mask, labels, pixel_values


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(*batch)
    out['loss'].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize('mode,scope,text_pass', [
    ('vanilla', 'sequence', 'removed'),
    ('cmo', 'sequence', 'removed'),
    ('cal', 'reference', 'masked'),
])
@pytest.mark.parametrize('model_type,trainable', [
    ('llama', ('projector', )),
    ('qwen2', ('llm', 'projector')),
])
def test_model_chunked_loss_equals_full_logits(model_type, trainable, mode, scope, text_pass):
    loss = dict(type='VisualRelevanceLoss', mode=mode, scope=scope,
                clamp=(1.0, 5.0) if mode == 'cal' else None)
    models = {chunk: build_model(model_type, loss=loss, trainable=trainable, text_pass=text_pass,
                                 loss_chunk_size=chunk) for chunk in (None, 3)}
    assert models[None].split_llm is None and models[3].split_llm is not None
    with torch.no_grad():  # sharper distributions, a stronger image: the weights vary
        for model in models.values():
            model.llm.lm_head.weight.mul_(40)
            model.projector.linear_2.weight.mul_(20)
    input_ids, attention_mask, pixel_values = make_batch()
    labels = supervised_labels(models[None], input_ids, attention_mask, pixel_values)
    batch = input_ids, attention_mask, labels, pixel_values
    (want, want_grads), (got, got_grads) = (loss_and_grads(models[c], batch) for c in (None, 3))
    assert set(got) == set(want)
    for key in want:
        assert abs(got[key].item() - want[key].item()) < 1e-9, key
    if mode != 'vanilla':
        assert 0 < got['cmo_at_min'].item() < 1
    assert got_grads.keys() == want_grads.keys()
    assert any(n.startswith('projector.') for n in got_grads)
    assert ('llm.lm_head.weight' in got_grads) == ('llm' in trainable)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-10, rtol=1e-7, msg=name)


def test_chunked_loss_trains_lora_of_the_proxy_llm():
    lora = dict(r=4, lora_alpha=8, target_modules='all-linear')
    input_ids = torch.randint(5, 175, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = (input_ids, torch.ones_like(input_ids), input_ids.clone())
    results = []
    for chunk in (None, 4):
        torch.manual_seed(0)  # LoRA A is drawn from the global generator
        model = LlavaDPAModel(llm=dict(type='ProxyLLMWrapper', llm=llm_cfg(), lora=lora),
                              tokenizer=dict(type='TinyTokenizer'), vision_tower=None,
                              trainable=('lora', ), loss_chunk_size=chunk).double()
        assert (model.split_llm is None) == (chunk is None)
        with torch.no_grad():  # LoRA B starts at zero: make the adapter matter
            for name, param in model.named_parameters():
                if 'lora_B' in name:
                    param.fill_(0.01)
        results.append(loss_and_grads(model, batch))
    (want, want_grads), (got, got_grads) = results
    assert abs(got['loss'].item() - want['loss'].item()) < 1e-10
    assert got_grads.keys() == want_grads.keys() and all('lora_' in n for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-10, rtol=1e-7, msg=name)


# --------------------------------------------------------------------------
# Post-processed logits and the fallback
# --------------------------------------------------------------------------
def gemma2_cfg(softcapping):
    return dict(type='HFCausalLM', torch_dtype='float64', attn_implementation='eager',
                config=dict(model_type='gemma2', vocab_size=512, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, final_logit_softcapping=softcapping,
                            max_position_embeddings=1024))


def test_gemma2_softcapping_is_applied():
    llm = MODELS.build(gemma2_cfg(softcapping=0.5))
    with torch.no_grad():
        llm.lm_head.weight.mul_(50)  # logits far beyond the cap
    split = SplitCausalLM(llm, chunk_size=4)
    assert split.postprocess is not None
    split.check_against(llm)
    input_ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = llm(input_ids=input_ids).logits[0]
        hidden = split.decoder(input_ids=input_ids).last_hidden_state[0]
        logit, logp = split.target_scores(hidden, input_ids[0])
    torch.testing.assert_close(logp, target_scores(want, input_ids[0])[1])
    assert want.abs().max() <= 0.5
    # Without the cap the head's raw logits would give other scores.
    raw_logp = target_scores(split.lm_head(hidden), input_ids[0])[1]
    assert (raw_logp - logp).abs().max() > 1.0
    assert logit_postprocess(MODELS.build(llm_cfg()).config) is None


class ScaledLogitsLlama(LlamaForCausalLM):
    """A family whose forward post-processes logits in a way not known to the toolkit."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


@MODELS.register_module(force=True)
def ScaledLogitsLLM(**kwargs):
    llm = MODELS.build(llm_cfg())
    scaled = ScaledLogitsLlama(llm.config)
    scaled.load_state_dict(llm.state_dict())
    return scaled.double()


def test_unknown_logit_postprocessing_falls_back_to_the_llm_forward():
    loss = dict(type='VisualRelevanceLoss', mode='cmo')
    torch.manual_seed(0)
    model = LlavaDPAModel(llm=dict(type='ScaledLogitsLLM'), tokenizer=dict(type='TinyTokenizer'),
                          vision_tower=VISION_CFG, loss=loss, loss_chunk_size=4).double()
    assert model.split_llm is None  # the probe saw that decoder + head miss the scaling
    batch = labelled_batch(model)
    with torch.no_grad():
        out = model(*batch)
        logits = model(*batch[:2], pixel_values=batch[3], mode='tensor')
    # Vanilla reads the model's own (scaled) logits.
    model.loss_fn.mode = 'vanilla'
    with torch.no_grad():
        vanilla = model(*batch)['loss']
    want = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), batch[2][:, 1:].reshape(-1),
                                       ignore_index=IGNORE_INDEX)
    assert abs(vanilla.item() - want.item()) < 1e-10
    # Forcing the split would drop the scaling and change the loss.
    model.split_llm = SplitCausalLM(model.llm, chunk_size=4)
    with torch.no_grad():
        assert abs(model(*batch)['loss'].item() - want.item()) > 1e-3
    assert torch.isfinite(out['loss'])


def test_loss_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match='loss_chunk_size'):
        build_model(loss_chunk_size=0)


# --------------------------------------------------------------------------
# No (batch x length x vocab) tensor
# --------------------------------------------------------------------------
class LargestVocabTensor(TorchDispatchMode):
    """Records the most vocabulary-sized rows any op allocates (views, such as
    the transposed LM head weight, allocate nothing)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if (isinstance(tensor, torch.Tensor) and tensor.dim()
                    and tensor.shape[-1] == self.vocab
                    and tensor.untyped_storage().data_ptr() not in inputs):
                self.rows = max(self.rows, tensor.numel() // self.vocab)
        return out


@pytest.mark.parametrize('mode', ['vanilla', 'cmo'])
def test_no_batch_by_length_by_vocab_tensor(mode):
    loss = dict(type='VisualRelevanceLoss', mode=mode)
    batch = None
    rows = {}
    for chunk in (None, 4):
        model = build_model('qwen2', loss=loss, trainable=('llm', 'projector'),
                            loss_chunk_size=chunk).train()
        batch = batch or labelled_batch(model)
        with LargestVocabTensor(512) as spy:
            model(*batch)['loss'].backward()
        rows[chunk] = spy.rows
    input_ids = batch[0]
    assert rows[None] >= input_ids.numel()  # the full-logits path: the spy sees it
    assert rows[4] <= 4
