"""The LLaVA-style multimodal LLM trained by every DPA stage."""
from collections import OrderedDict
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn
from torch.profiler import record_function
from mmengine.model import BaseModel
from safetensors.torch import load_file

from dpa.models.anyres import AnyRes, add_image_newline
from dpa.errors import ConfigError
from dpa.models.builders import IMAGE_TOKEN, PROCESSORS, llm_config, num_image_tokens
from dpa.models.chunked_loss import SplitCausalLM, check_chunk_size
from dpa.models.losses import target_scores
from dpa.models.token_classes import content_token_mask
from dpa.registry import MODELS

TRAINABLE_PARTS = ('llm', 'lora', 'projector', 'vision_tower')
TEXT_PASSES = ('removed', 'masked')
REFERENCE_NEEDS_MASKED = (
    "loss.scope='reference' reproduces fnlp-vision/DPA only with model.text_pass='masked': "
    'the removed pass has no scores for the image and padding positions the reference '
    'smooths over')
REFERENCE_HAS_NO_TEXT_CONTEXT_SWITCHES = (
    "loss.scope='reference' reproduces fnlp-vision/DPA, whose no-image pass reads every "
    'target wherever it stands and puts no prompt where the image was; leave '
    'model.min_text_context=1 and model.text_pass_prompt=None with it')


def enable_activation_checkpointing(llm: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass
    (non-reentrant, so frozen layers before LoRA ones still pass gradients)."""
    kwargs = dict(use_reentrant=False)
    if hasattr(llm, 'activation_checkpointing_enable'):  # its name in recent transformers 5.x
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # the older name, deprecated since
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def right_padding_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a right-padded batch: real tokens get 0..n-1, as
    without padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@MODELS.register_module()
class LlavaDPAModel(BaseModel):
    """Vision tower -> projector -> causal LLM, with a visual-relevance loss.

    The sequence holds one ``<image>`` token id per image feature (the dataset
    expands the placeholder); their embeddings are replaced by the projected
    vision features.

    Args:
        llm: config of the LLM (``HFCausalLM`` or ``ProxyLLMWrapper``).
        tokenizer: config of the tokenizer (gives the ``<image>`` id).
        vision_tower: config of an ``HFVisionTower``; None for a text-only
            model (stage 1 trains the LLM on caption text alone).
        projector: config of the connector, ``dict(type='mlp2x_gelu')``.
        projector_weights: safetensors file to initialise the projector from
            (stage 2's artifact).
        loss: config of a ``VisualRelevanceLoss``.
        trainable: which parts train, among ``TRAINABLE_PARTS``; the rest is
            frozen.
        text_pass: how CMO/CAL compute the scores without the image:
            ``'removed'`` drops the image tokens and keeps the original position
            ids with an explicit attention mask (equal to the reference's pass,
            a fraction of its tokens); ``'masked'`` is the reference's
            full-length pass with the image positions masked out.
        min_text_context: a target gets a no-image score only when at least
            this many text tokens precede it in the no-image context (the
            token that predicts it and the ones before); the others get
            ``delta_min``, as a target with no text before it. 1: any text
            will do (the default). Not in the reference (docs/architecture.md).
        text_pass_prompt: text put where the image was in the no-image pass
            only (its tokens in the first image positions of each row, with
            their position ids; the other image positions are left out as
            without it), so a caption is scored without the image but after
            a caption prompt. Tokenized once here, without special tokens;
            it must fit in one image's positions. None: no prompt (the
            default). Not in the reference.
        gradient_checkpointing: trade compute for activation memory in the LLM.
        loss_chunk_size: the loss reads the LLM's last hidden states and applies
            its LM head to the scored positions only, this many rows at a time,
            so no (batch x length x vocab) logits are made (see
            :mod:`dpa.models.chunked_loss`). None: the LLM's own forward
            computes the full logits (also the fallback for an LLM that cannot
            be split into decoder + head).
        trainable_dtype: the dtype the trainable parameters are held in, the
            one the optimizer steps (``'float32'``: master weights for bf16
            compute under autocast, see :mod:`dpa.engine.precision`); None
            keeps the dtype they are loaded in. Frozen parameters keep theirs.
        anyres: LLaVA-NeXT's dynamic resolution, ``dict(grid_pinpoints=...)``
            or ``dict(grid_shapes=...)``, optionally ``max_tiles`` (the
            arguments of :class:`dpa.models.anyres.AnyRes`); images then come
            as tiles with their sizes and the projector gains ``image_newline``.
            None: one fixed-size image of N tokens.
    """

    def __init__(self,
                 llm: dict,
                 tokenizer: dict,
                 vision_tower: Optional[dict] = None,
                 projector: dict = dict(type='mlp2x_gelu'),
                 projector_weights: Optional[str] = None,
                 loss: dict = dict(type='VisualRelevanceLoss', mode='vanilla'),
                 trainable: Sequence[str] = ('projector', ),
                 text_pass: str = 'removed',
                 min_text_context: int = 1,
                 text_pass_prompt: Optional[str] = None,
                 gradient_checkpointing: bool = False,
                 loss_chunk_size: Optional[int] = 512,
                 trainable_dtype: Optional[str] = None,
                 anyres: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        unknown = set(trainable) - set(TRAINABLE_PARTS)
        if unknown:
            raise ValueError(f'model.trainable has unknown parts {sorted(unknown)}; '
                             f'choose among {TRAINABLE_PARTS}')
        if text_pass not in TEXT_PASSES:
            raise ValueError(f'model.text_pass must be one of {TEXT_PASSES}, got {text_pass!r}')
        check_chunk_size(loss_chunk_size)
        check_text_context(min_text_context, text_pass_prompt)
        self.loss_fn = MODELS.build(loss)
        if getattr(self.loss_fn, 'scope', None) == 'reference':
            if text_pass != 'masked':
                raise ValueError(REFERENCE_NEEDS_MASKED)
            if (min_text_context, text_pass_prompt) != (1, None):
                raise ValueError(REFERENCE_HAS_NO_TEXT_CONTEXT_SWITCHES)
        self.text_pass = text_pass
        self.min_text_context = min_text_context
        tokenizer = PROCESSORS.build(tokenizer)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # Token ids, made into a tensor on the batch's device at each pass.
        self.text_pass_prompt_ids = None
        if text_pass_prompt is not None and vision_tower is not None:
            # Checked against the tower's config before the LLM loads.
            self.text_pass_prompt_ids = prompt_token_ids(tokenizer, text_pass_prompt,
                                                         num_image_tokens(vision_tower))
        self.llm = MODELS.build(llm)
        if self.loss_fn.needs_text_pass:
            self.loss_fn.content_tokens = content_token_mask(
                tokenizer, self.llm.get_output_embeddings().out_features)
        self.vision_tower = self.projector = self.anyres = None
        self.projector_type = projector['type']
        if vision_tower is not None:
            self.vision_tower = MODELS.build(vision_tower)
            self.projector = MODELS.build(
                projector,
                default_args=dict(vision_dim=self.vision_tower.hidden_size,
                                  llm_dim=self.llm.config.get_text_config().hidden_size))
            if anyres is not None:
                self.anyres = AnyRes.for_vision_tower(self.vision_tower, **anyres)
                add_image_newline(self.projector, self.llm.config.get_text_config().hidden_size)
            if projector_weights is not None:
                self.projector.load_state_dict(load_file(projector_weights))
        self._set_trainable(trainable)
        if trainable_dtype is not None:
            self._hold_trainable_in(getattr(torch, trainable_dtype))
        if gradient_checkpointing:
            enable_activation_checkpointing(self.llm)
        # Checkpoints hold the trainable weights only; on resume the frozen ones
        # come from their sources again.
        self.register_load_state_dict_pre_hook(self._keep_frozen_weights)
        self.split_llm = SplitCausalLM.try_split(self.llm, loss_chunk_size)
        # Set by a sharding wrapper (FSDP2): a rank whose batch holds no image
        # still runs the no-image pass and gives the projector a (zero)
        # gradient, as the ranks with images do (see embed, text_only_outputs).
        self.same_passes_on_every_rank = False

    def _set_trainable(self, trainable):
        self.requires_grad_(False)
        for part in trainable:
            if part == 'lora':
                for name, param in self.llm.named_parameters():
                    if 'lora_' in name:
                        param.requires_grad_(True)
            else:
                module = getattr(self, part)
                if module is None:
                    raise ValueError(f'model.trainable names {part!r} but the model has no {part}')
                module.requires_grad_(True)
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError(f'model.trainable={list(trainable)} leaves nothing to train')

    def init_weights(self):
        """Nothing to initialise here: the LLM and the vision tower come from
        checkpoints (or seeded stand-ins), LoRA from PEFT (B = 0, so the proxy
        starts as the base LLM), the projector from its constructor or stage
        2's weights. mmengine's Runner calls this before training; its
        default would run transformers' ``_init_weights`` over the modules
        added after loading, redrawing both LoRA matrices (B no longer zero)."""

    def _other_ranks_have_images(self, has_images: bool) -> bool:
        """Under a sharding wrapper (``same_passes_on_every_rank``), whether
        any rank's batch holds images (every rank asks, once per forward);
        False otherwise. When none has, the projector gets no gradient
        anywhere and the optimizer skips it, as under DDP."""
        if not self.same_passes_on_every_rank or self.projector is None:
            return False
        flag = torch.tensor(float(has_images), device=next(self.projector.parameters()).device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _hold_trainable_in(self, dtype: torch.dtype):
        # Tied parameters are one object: cast once, still tied.
        for param in self.parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)

    def state_dict(self, *args, **kwargs):
        trainable = {name for name, param in self.named_parameters() if param.requires_grad}
        full = super().state_dict(*args, **kwargs)
        return OrderedDict((k, v) for k, v in full.items() if k in trainable)

    def _keep_frozen_weights(self, module, state_dict, prefix, *args):
        for name, param in self.named_parameters(prefix=prefix.rstrip('.')):
            if not param.requires_grad and name not in state_dict:
                state_dict[name] = param.detach()

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
              image_sizes: Optional[torch.Tensor] = None):
        """Token embeddings with the image features in the ``<image>`` slots
        (AnyRes: ``pixel_values`` are the images' tiles, ``image_sizes`` their
        original (height, width))."""
        image_mask = input_ids == self.image_token_id
        # The <image> id may lie outside the LLM's vocabulary: look up id 0 there.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if pixel_values is None:
            if image_mask.any():
                raise ValueError('the batch holds <image> tokens but no pixel_values')
            if self._other_ranks_have_images(False):
                # A zero gradient for the projector, as DDP gives an unused
                # parameter that another rank used: sharded gradients are
                # reduced together, and this rank must bring its share.
                embeds = embeds + 0 * sum(p.sum() for p in self.projector.parameters())
            return embeds, image_mask
        if self.vision_tower is None:
            raise ValueError('this model has no vision tower (text-only stage) but got images')
        self._other_ranks_have_images(True)
        projector_dtype = next(self.projector.parameters()).dtype
        features = self.vision_tower(pixel_values).to(projector_dtype)
        features = self.projector(features).to(embeds.dtype)
        if self.anyres is not None:
            if image_sizes is None:
                raise ValueError('an anyres model needs the image_sizes of its pixel_values')
            features = torch.cat(self.anyres.merge(features, image_sizes,
                                                   self.projector.image_newline))
        if image_mask.sum() != features.shape[:-1].numel():
            raise ValueError(f'{int(image_mask.sum())} <image> tokens in the batch for '
                             f'{features.shape[:-1].numel()} image features')
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features), image_mask

    def _llm_logits(self, embeds, attention_mask, position_ids):
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=False).logits

    def llm_outputs(self, embeds, attention_mask, position_ids):
        """What the loss scores per position: the last hidden states when the
        LLM is split into decoder + head (the head then runs on the scored
        positions only, in chunks), else the full logits."""
        if self.split_llm is None:
            return self._llm_logits(embeds, attention_mask, position_ids)
        return self.split_llm.hidden_states(embeds, attention_mask, position_ids)

    @property
    def score_fn(self):
        return target_scores if self.split_llm is None else self.split_llm.target_scores

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None,
                position_ids=None, mode='loss', image_sizes=None):
        """Args:
            input_ids, labels: (B, T).
            attention_mask: (B, T) right-padding mask; None for a packed batch.
            pixel_values: images of the rows holding ``<image>`` tokens.
            position_ids: given by packed batches (several sequences per row,
                positions restarting at 0 for each): attention is then kept
                inside each sequence (see :mod:`dpa.datasets.packing`).
            mode: ``'loss'`` or ``'tensor'`` (the logits).
            image_sizes: (images, 2) for an AnyRes model, see :meth:`embed`.
        """
        if (position_ids is None) == (attention_mask is None):
            raise ValueError('give attention_mask (padded batch) or position_ids (packed batch)')
        if mode == 'tensor':
            embeds, _ = self.embed(input_ids, pixel_values, image_sizes)
            if position_ids is None:
                position_ids = right_padding_positions(attention_mask)
            return self._llm_logits(embeds, attention_mask, position_ids)
        if mode != 'loss':
            raise ValueError(f"LlavaDPAModel supports mode='loss' and 'tensor', got {mode!r}")
        needs_text_pass = self.loss_fn.needs_text_pass
        return self.loss_fn(**self.loss_inputs(
            input_ids, attention_mask, labels, pixel_values, position_ids, needs_text_pass,
            image_sizes, lazy=needs_text_pass and self.text_pass == 'removed'
            and self.loss_fn.skips_floor_targets))

    def loss_inputs(self, input_ids, attention_mask, labels, pixel_values=None,
                    position_ids=None, text_pass: bool = True, image_sizes=None,
                    lazy: bool = False) -> dict:
        """The keyword arguments of the loss for one batch (see
        :meth:`VisualRelevanceLoss.forward`): the outputs of the image pass
        and, with ``text_pass``, of the no-image pass.

        ``lazy`` (the removed pass only): instead of the no-image pass's
        outputs, a function the loss calls once it has the image scores,
        with the targets whose no-image score it needs (``wanted``, (B, T-1)
        bool); the pass then runs on the rows holding such a target only,
        each cut after the last token that predicts one (the hidden states
        of a causal LM at a position do not depend on later tokens). CMO
        needs no text score where the image probability is at most
        ``delta_min``; a batch with none above it runs no pass at all.

        The ``dpa.*`` regions are what ``tools/benchmark.py --profile`` reports."""
        with record_function('dpa.embed'):
            embeds, image_mask = self.embed(input_ids, pixel_values, image_sizes)
        if position_ids is None:
            position_ids = right_padding_positions(attention_mask)
        text_outputs = text_index = None
        if text_pass and attention_mask is None:
            raise ValueError(f'loss.mode={self.loss_fn.mode!r} needs the no-image pass, '
                             'which packed batches do not support; pad the batch instead')
        if text_pass and not lazy:
            # Before the training pass, so that its activations are not held
            # while this pass runs: peak memory stays the training pass's.
            with torch.no_grad(), record_function('dpa.text_pass'):
                text_outputs, text_index = self.text_only_outputs(
                    embeds.detach(), attention_mask, position_ids, image_mask)
        with record_function('dpa.image_pass.forward'):
            outputs = self.llm_outputs(embeds, attention_mask, position_ids)
        inputs = dict(outputs=outputs[:, :-1], targets=labels[:, 1:], text_outputs=text_outputs,
                      text_index=text_index, score_fn=self.score_fn)
        if text_pass and lazy:
            inputs['text_pass'] = partial(self._lazy_text_pass, embeds.detach(), attention_mask,
                                          position_ids, image_mask)
        return inputs

    def _lazy_text_pass(self, embeds, attention_mask, position_ids, image_mask, wanted):
        """The no-image pass for the ``wanted`` targets (see :meth:`loss_inputs`).

        Returns ``(text_outputs, text_index, available)``: those of
        :meth:`text_only_outputs` (``text_index`` -1 outside the rows and
        positions run) and the (B, T-1) targets that have text evidence at
        all (``text_index >= 0`` of the full pass), whether scored or not.
        The pass runs with its own random state: whether and how far it runs
        does not move the random numbers (dropout) of the training pass.
        """
        cuda = [embeds.device.index or 0] if embeds.device.type == 'cuda' else []
        with torch.no_grad(), record_function('dpa.text_pass'), \
                torch.random.fork_rng(devices=cuda):
            outputs, index = self.text_only_outputs(embeds, attention_mask, position_ids,
                                                    image_mask, wanted)
        return outputs, index, self.text_evidence(attention_mask, image_mask)

    def _compact_text(self, attention_mask, image_mask):
        """``(keep, previous, evidence)``: the (B, T) tokens the no-image pass
        keeps (the text, and the prompt's positions with ``text_pass_prompt``);
        for each (B, T-1) shifted target j, the index of the kept token just
        before it in the compact sequence (negative: none), which predicts it;
        and the targets it predicts: a text token, after at least
        ``min_text_context`` kept tokens, in a row with an image."""
        text = attention_mask.bool() & ~image_mask
        keep = text
        if self.text_pass_prompt_ids is not None:
            keep = text | self._prompt_slots(image_mask)
        previous = keep.long().cumsum(-1)[:, 1:] - 2
        evidence = (image_mask.any(dim=-1, keepdim=True) & text[:, 1:]
                    & (previous >= self.min_text_context - 1))
        return keep, previous, evidence

    def _prompt_slots(self, image_mask):
        """(B, T) the first image positions of each row, one per prompt token."""
        return image_mask & (image_mask.long().cumsum(-1) <= len(self.text_pass_prompt_ids))

    def _with_prompt(self, embeds, image_mask):
        """``embeds`` with the prompt's token embeddings in :meth:`_prompt_slots`."""
        if self.text_pass_prompt_ids is None:
            return embeds
        size = len(self.text_pass_prompt_ids)
        counts = image_mask.sum(dim=-1)
        counts = counts[counts > 0]
        if counts.numel() == 0:
            return embeds
        if int(counts.min()) < size:
            raise ValueError(
                f'model.text_pass_prompt is {size} tokens long, but a row of this batch holds '
                f'only {int(counts.min())} image positions to put it in; shorten the prompt '
                'or set model.text_pass_prompt=None')
        ids = torch.tensor(self.text_pass_prompt_ids, device=embeds.device)
        prompt = self.llm.get_input_embeddings()(ids).to(embeds.dtype)
        rows = counts.numel()
        # masked_scatter fills the slots row by row, each row's in order.
        return embeds.masked_scatter(self._prompt_slots(image_mask).unsqueeze(-1),
                                     prompt.repeat(rows, 1))

    def text_evidence(self, attention_mask, image_mask) -> torch.Tensor:
        """(B, T-1): the shifted targets the no-image pass predicts."""
        return self._compact_text(attention_mask, image_mask)[2]

    @property
    def reads_like_reference(self) -> bool:
        """Whether the masked pass reads every target at the position before it,
        as the reference does (the first target after an image at the last image
        position): with neither context switch set."""
        return self.min_text_context == 1 and self.text_pass_prompt_ids is None

    def text_only_outputs(self, embeds, attention_mask, position_ids, image_mask, wanted=None):
        """:meth:`llm_outputs` of the same batch without its image tokens.

        Returns ``(text_outputs, text_index)``: (M, F) outputs and a (B, T-1)
        map from each shifted target position to the row of ``text_outputs``
        that predicts it from the text alone (-1 where there is none: rows
        without an image, whose two passes are the same, and targets with
        fewer than ``min_text_context`` text tokens before them). With
        ``text_pass_prompt`` the prompt stands in the first image positions.
        The masked pass reads every position as the reference does unless a
        context switch is set (:attr:`reads_like_reference`); then it reads
        the targets the removed pass reads, where the removed pass does.

        ``wanted`` ((B, T-1) bool): only the rows with a wanted target run,
        each up to the last token that predicts one; ``text_index`` is -1
        for the targets not computed.
        """
        batch, length = attention_mask.shape
        keep, previous, evidence = self._compact_text(attention_mask, image_mask)
        if self.text_pass == 'masked':
            outputs = self.llm_outputs(self._with_prompt(embeds, image_mask),
                                       attention_mask * keep, position_ids)[:, :-1]
            index = torch.arange(batch * (length - 1), device=embeds.device).view(batch, length - 1)
            if not self.reads_like_reference:
                # Each target read at the kept token before it, as in the removed
                # pass: its text context, not the last image position (whose
                # own input is the image feature).
                positions = torch.arange(length, device=embeds.device)
                last_kept = torch.where(keep, positions, -1).cummax(dim=-1).values[:, :-1]
                index = torch.where(evidence, index - positions[:-1] + last_kept, -1)
            return outputs.reshape(-1, outputs.shape[-1]), index

        text_index = torch.full((batch, length - 1), -1, dtype=torch.long, device=embeds.device)
        run = image_mask.any(dim=-1)
        if wanted is not None:
            wanted = wanted & evidence
            run = run & wanted.any(dim=-1)
        rows = run.nonzero().squeeze(-1)
        if rows.numel() == 0:
            if self.same_passes_on_every_rank:
                # Sharded layers gather their weights with collectives on each
                # call: every rank must call them as often as the others. The
                # random state is kept: dropout (LoRA's) in this discarded pass
                # must not change the masks of the passes that count.
                cuda = [embeds.device.index] if embeds.device.type == 'cuda' else []
                with torch.random.fork_rng(devices=cuda):
                    self.llm_outputs(embeds[:1, :1], attention_mask[:1, :1],
                                     position_ids[:1, :1])
            return embeds.new_zeros((0, self.output_size)), text_index
        kept = keep[rows]
        lengths = kept.sum(-1)
        if wanted is not None:
            # Up to the last token that predicts a wanted target.
            needed = torch.where(wanted, previous + 1, torch.zeros_like(previous)).amax(-1)
            lengths = torch.minimum(lengths, needed[rows])
        text_len = int(lengths.max())
        # Stable sort moves each row's kept tokens to the front, in order.
        order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)[:, :text_len]
        row_embeds = self._with_prompt(embeds[rows], image_mask[rows])
        text_embeds = row_embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        text_positions = position_ids[rows].gather(1, order)
        text_mask = (torch.arange(text_len, device=embeds.device) < lengths.unsqueeze(-1)).long()
        with record_function('dpa.text_pass.forward'):
            outputs = self.llm_outputs(text_embeds, text_mask, text_positions)

        slot = torch.full((batch, ), -1, dtype=torch.long, device=embeds.device)
        slot[rows] = torch.arange(rows.numel(), device=embeds.device)
        valid = (slot.unsqueeze(-1) >= 0) & evidence
        if wanted is not None:
            computed = torch.zeros_like(slot)
            computed[rows] = lengths
            valid &= previous < computed.unsqueeze(-1)
        text_index = torch.where(valid, slot.unsqueeze(-1) * text_len + previous, text_index)
        return outputs.reshape(-1, outputs.shape[-1]), text_index

    @property
    def output_size(self) -> int:
        """Size of :meth:`llm_outputs` per position: hidden size or vocabulary."""
        if self.split_llm is None:
            return self.llm.get_output_embeddings().out_features
        return self.llm.config.get_text_config().hidden_size


def check_reference_scope(text_pass: str, loss: dict, stage: str) -> None:
    """The reference's loss scope needs the masked no-image pass (config check)."""
    if loss.get('scope') == 'reference' and text_pass != 'masked':
        raise ConfigError(f'{stage}.{REFERENCE_NEEDS_MASKED}')


def check_sliding_window(llm: dict, text_pass: str, max_length: int, stage: str) -> None:
    """The removed no-image pass shifts later tokens closer to earlier ones in
    sequence order, which is what a sliding window (Gemma-2, Mistral) counts:
    it equals the reference's masked pass only while samples fit the window
    (config check: the LLM's config is read, no weights)."""
    if text_pass != 'removed':
        return
    text_cfg = llm_config(llm).get_text_config()
    window = getattr(text_cfg, 'sliding_window', None)
    if window and 'sliding_attention' in (getattr(text_cfg, 'layer_types', None) or []):
        if max_length > window:
            raise ConfigError(
                f'{stage}.max_length={max_length} exceeds the LLM\'s sliding window of '
                f"{window} tokens: the no-image pass would see other neighbours than the "
                "image pass; lower it or set model.text_pass='masked'")


def check_text_context(min_text_context, text_pass_prompt) -> None:
    """The values of ``model.min_text_context`` and ``model.text_pass_prompt``
    (raises ValueError)."""
    if isinstance(min_text_context, bool) or not isinstance(min_text_context, int) or \
            min_text_context < 1:
        raise ValueError('model.min_text_context must be an integer >= 1 (1: any text before a '
                         f'target will do), got {min_text_context!r}')
    if text_pass_prompt is not None and (not isinstance(text_pass_prompt, str)
                                         or not text_pass_prompt.strip()):
        raise ValueError("model.text_pass_prompt must be None or a non-empty string such as "
                         f"'Describe the image briefly.', got {text_pass_prompt!r}")


def prompt_token_ids(tokenizer, prompt: str, image_tokens: int) -> tuple:
    """The ids of ``prompt`` (no special tokens), which must fit in the
    ``image_tokens`` positions of one image (raises ValueError)."""
    ids = tuple(tokenizer(prompt, add_special_tokens=False)['input_ids'])
    if not ids:
        raise ValueError(f'model.text_pass_prompt={prompt!r} has no tokens')
    if len(ids) > image_tokens:
        raise ValueError(
            f'model.text_pass_prompt={prompt!r} is {len(ids)} tokens long, more than the '
            f'{image_tokens} positions of one image it stands in for; shorten it')
    return ids


def check_text_context_config(cfg, loss: dict, stage: str) -> None:
    """``model.min_text_context`` and ``model.text_pass_prompt`` (config
    check: with a prompt, the tokenizer is built to count its tokens; no
    weights load)."""
    model = cfg.model
    min_text_context = model.get('min_text_context', 1)
    prompt = model.get('text_pass_prompt')
    try:
        check_text_context(min_text_context, prompt)
        if prompt is not None and stage != 'proxy' and cfg.get('vision_tower') is not None:
            prompt_token_ids(PROCESSORS.build(cfg.tokenizer), prompt,
                             num_image_tokens(cfg.vision_tower))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if loss.get('scope') == 'reference' and (min_text_context, prompt) != (1, None):
        raise ConfigError(f'{stage}.{REFERENCE_HAS_NO_TEXT_CONTEXT_SWITCHES}')
