"""The training-step variants of the benchmark: the model, its batches, the
losses (vanilla, CAL, CMO as this toolkit computes them, and CMO restated the
reference implementation's way) and the run over shapes, stages and vocabularies."""
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.optim import OptimWrapper

from dpa.datasets.llava import dpa_collate
from dpa.models import LlavaDPAModel, VisualRelevanceLoss
from dpa.models.losses import IGNORE_INDEX
from .peer import peer_loss, transformers_llava
from .timing import interleaved_steps

IMAGE_TOKEN_ID = 3  # '<image>' of TinyTokenizer
FIRST_TEXT_ID = 5
IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches
VARIANTS = ('vanilla', 'cal', 'cmo', 'cmo_all_text_scores', 'cmo_reference', 'hf_llava',
            'vanilla_full_logits')
DEFAULT_VARIANTS = ('vanilla', 'cal', 'cmo', 'cmo_reference', 'hf_llava')
LOSS_MODES = dict(vanilla='vanilla', cal='cal', cmo='cmo', cmo_all_text_scores='cmo',
                  cmo_reference='cmo',
                  hf_llava='vanilla', vanilla_full_logits='vanilla')


@dataclass
class Shape:
    """Samples of one kind of training data.

    Args:
        text_tokens: mean text tokens of a sample (rows of a batch spread over
            +-25% around it).
        text_only: share of the samples without an image.
        prompt: share of the text that is prompt (not supervised).
        grid: AnyRes (LLaVA-NeXT) images of (rows, columns) tiles plus the
            base tile, ``spatial_unpad`` with a newline per row; None: one
            576-token image.
    """
    text_tokens: int
    text_only: float = 0.0
    prompt: float = 0.0
    grid: Optional[Tuple[int, int]] = None

    def image_tokens(self) -> int:
        if self.grid is None:
            return IMAGE_TOKENS
        rows, columns = self.grid  # the image has the grid's own aspect: nothing unpadded
        return IMAGE_TOKENS + rows * TILE_SIDE * (columns * TILE_SIDE + 1)


TILE_SIDE = 24  # patches along a tile's side: 96-pixel tiles of 4-pixel patches
# anyres: a 2 x 2 grid + the base tile, 2,928 image tokens (as CLIP-L/336 at 672 x 672).
SHAPES = dict(blip_lcs=Shape(48), sharegpt4v=Shape(256),
              instruct=Shape(512, text_only=0.3, prompt=0.25), anyres=Shape(48, grid=(2, 2)))


# ---------------------------------------------------------------- model and data
def build_model(args, vocab_size: int, trainable, with_vision=True, lora_rank=None,
                grid: Optional[Tuple[int, int]] = None):
    llm = dict(type='HFCausalLM', torch_dtype=args.dtype,
               config=dict(model_type='qwen2', vocab_size=vocab_size,
                           hidden_size=args.hidden_size,
                           intermediate_size=args.intermediate_size,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                           tie_word_embeddings=False))
    if lora_rank:
        llm = dict(type='ProxyLLMWrapper', llm=llm,
                   lora=dict(r=lora_rank, lora_alpha=2 * lora_rank, target_modules='all-linear'))
    # A small CLIP with LLaVA-1.5's 576 image tokens: the vision tower is frozen
    # and costs every variant the same.
    vision = None if not with_vision else dict(
        type='HFVisionTower', torch_dtype=args.dtype, feature_layer=-2,
        config=dict(model_type='clip_vision_model', hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=2, image_size=96, patch_size=4))
    anyres = None if grid is None else dict(grid_shapes=[list(grid)])
    model = LlavaDPAModel(llm=llm, tokenizer=dict(type='TinyTokenizer'), vision_tower=vision,
                          trainable=trainable, loss_chunk_size=args.chunk_size, anyres=anyres)
    return model.to(args.device).train()


def make_batch(shape: Shape, batch_size: int, vocab_size: int, with_image: bool, args) -> dict:
    """A right-padded batch of ``<bos>`` (+ the image's tokens) + text, labels
    on the text after its prompt share."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for row in range(batch_size):
        spread = 0.75 + 0.5 * row / max(batch_size - 1, 1)
        n_text = max(2, round(shape.text_tokens * spread))
        text = torch.randint(FIRST_TEXT_ID, vocab_size, (n_text, ), generator=generator)
        prefix = torch.tensor([1] + [IMAGE_TOKEN_ID] * (shape.image_tokens() if with_image else 0))
        labels = text.clone()
        labels[:int(shape.prompt * n_text)] = IGNORE_INDEX
        sample = dict(input_ids=torch.cat([prefix, text]),
                      labels=torch.cat([torch.full_like(prefix, IGNORE_INDEX), labels]),
                      pixel_values=None)
        if with_image and shape.grid is None:
            sample['pixel_values'] = torch.randn(3, 96, 96, generator=generator)
        elif with_image:
            rows, columns = shape.grid
            sample['pixel_values'] = torch.randn(1 + rows * columns, 3, 96, 96,
                                                 generator=generator)
            sample['image_size'] = torch.tensor([rows * 96, columns * 96])
        samples.append(sample)
    batch = dpa_collate(samples)
    dtype = getattr(torch, args.dtype)
    return {k: (v.to(args.device, dtype) if k == 'pixel_values' else v.to(args.device))
            for k, v in batch.items() if v is not None}


def shape_batches(shape: Shape, stage: str, vocab_size: int, args) -> List[Tuple[dict, float]]:
    """(batch, share of the steps) of a shape: image batches, and text-only
    batches for the share of text-only samples when the LLM trains (with the
    LLM frozen, a text-only sample trains nothing)."""
    text_only = shape.text_only if stage == 'finetune' else 0.0
    batches = [(make_batch(shape, args.batch_size, vocab_size, True, args), 1 - text_only)]
    if text_only:
        batches.append((make_batch(shape, args.batch_size, vocab_size, False, args), text_only))
    return batches


# ---------------------------------------------------------------- the reference's way
def reference_cmo_loss(model: LlavaDPAModel, input_ids, attention_mask, labels,
                       pixel_values=None, clamp=(0.05, 0.5), image_sizes=None) -> dict:
    """CMO as fnlp-vision/DPA computes it (``llava_qwen_dpa.py``), restated
    for the benchmark: a full-length no-image pass with the image positions
    masked out, full-vocabulary float32 logits of both passes, a clone and two
    softmaxes, smoothing over the flattened batch."""
    embeds, image_mask = model.embed(input_ids, pixel_values, image_sizes)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        mask_without_image = attention_mask.clone()
        mask_without_image[image_mask] = 0
        logits_without_image = model.llm(inputs_embeds=embeds.clone().contiguous(),
                                         attention_mask=mask_without_image,
                                         position_ids=position_ids, use_cache=False).logits.float()
    logits = model.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False).logits.float()
    vocab = logits.shape[-1]
    shift_logits = logits[..., :-1, :].contiguous().view(-1, vocab)
    shift_labels = labels[..., 1:].contiguous().view(-1)
    with torch.no_grad():
        targets = shift_labels.clone()
        targets[targets == IGNORE_INDEX] = 0
        probs_image = torch.softmax(shift_logits.clone(), dim=-1)
        shift_without = logits_without_image[..., :-1, :].contiguous()
        del logits_without_image
        probs_text = torch.softmax(shift_without.reshape(-1, vocab), dim=-1)
        delta = (probs_image.gather(1, targets.unsqueeze(1))
                 - probs_text.gather(1, targets.unsqueeze(1))).clamp(*clamp)
        weights = F.avg_pool1d(delta[:, 0].view(1, 1, -1), 3, stride=1, padding=1,
                               count_include_pad=False)[0, 0]
        del probs_image, probs_text, shift_without
    loss = F.cross_entropy(shift_logits, shift_labels, reduction='none') * weights
    return {'loss': loss.sum() / (weights[shift_labels != IGNORE_INDEX].sum() + 1e-6)}


# ---------------------------------------------------------------- the runs
def step_fn(model, optim: OptimWrapper, batch: dict, loss: Callable) -> Callable[[], None]:
    """One optimizer step of ``model`` on ``batch`` with the loss ``loss(model, **batch)``."""

    def step():
        optim.update_params(loss(model, **batch)['loss'])
    return step


def variant_loss(variant: str, split_llm) -> Callable:
    """The loss of a variant, on the model the variants share."""
    loss_fn = VisualRelevanceLoss(mode=LOSS_MODES[variant])
    loss_fn.score_all_text = variant == 'cmo_all_text_scores'
    full_logits = variant in ('cmo_reference', 'vanilla_full_logits')
    peers = {}

    def loss(model, **batch):
        model.loss_fn = loss_fn
        model.split_llm = None if full_logits else split_llm
        if variant == 'cmo_reference':
            return reference_cmo_loss(model, **batch)
        if variant == 'hf_llava':
            if id(model) not in peers:
                peers[id(model)] = transformers_llava(model)
            return peer_loss(peers[id(model)], **batch)
        return model(**batch)
    return loss


def make_optimizer(model) -> OptimWrapper:
    params = [p for p in model.parameters() if p.requires_grad]
    return OptimWrapper(torch.optim.AdamW(params, lr=1e-6))


def with_ratios(results: Dict[str, dict], base: str) -> Dict[str, dict]:
    for result in results.values():
        result['ratio_to_vanilla'] = result['median_step_s'] / results[base]['median_step_s']
        result['mem_ratio_to_vanilla'] = result['peak_mem_mb'] / results[base]['peak_mem_mb']
        result['tokens_per_s'] = result['tokens_per_step'] / result['median_step_s']
    return results


def stage_models(args) -> List[Tuple[str, Optional[Tuple[int, int]], List[str]]]:
    """(stage, AnyRes grid, shapes) of each model a run builds: the shapes of
    one image layout share a model."""
    grids = {}
    for name in args.shapes:
        grids.setdefault(SHAPES[name].grid, []).append(name)
    return [(stage, grid, names) for stage in args.stages for grid, names in grids.items()]


def time_variants(model, optim: OptimWrapper, losses: Dict[str, Callable],
                  batches: List[Tuple[dict, float]], args) -> Dict[str, dict]:
    """Median step time, peak memory and tokens per step of each variant on
    ``batches`` ((batch, share of the steps) pairs, weighted by their share),
    with the ratios to vanilla, all in one interleaved run."""
    steps, timed = {}, {}
    for variant, loss in losses.items():
        for index, (batch, _) in enumerate(batches):
            steps[variant, index] = step_fn(model, optim, batch, loss)
            timed[variant, index] = (args.reference_steps
                                     if variant == 'cmo_reference' else args.steps)
    measured = interleaved_steps(steps, timed, args.warmup, args.device,
                                 getattr(args, 'clock', 'wall'))
    results = {}
    for variant in losses:
        # A step of this shape: its batches weighted by their share.
        parts = [(measured[variant, i], share, int(batch['attention_mask'].sum()))
                 for i, (batch, share) in enumerate(batches)]
        results[variant] = dict(
            median_step_s=sum(m['median_step_s'] * share for m, share, _ in parts),
            peak_mem_mb=max(m['peak_mem_mb'] for m, _, _ in parts),
            tokens_per_step=sum(tokens * share for _, share, tokens in parts))
    return with_ratios(results, 'vanilla')


def run_training_variants(args) -> List[dict]:
    records = []
    for vocab in args.vocab_sizes:
        for stage, grid, shape_names in stage_models(args):
            trainable = ('projector', ) if stage == 'align' else ('llm', 'projector')
            model = build_model(args, vocab, trainable, grid=grid)
            optim = make_optimizer(model)
            losses = {variant: variant_loss(variant, model.split_llm) for variant in args.variants}
            for shape_name in shape_names:
                batches = shape_batches(SHAPES[shape_name], stage, vocab, args)
                for variant, result in time_variants(model, optim, losses, batches,
                                                     args).items():
                    records.append(dict(vocab_size=vocab, shape=shape_name, stage=stage,
                                        variant=variant, batch_size=args.batch_size, **result))
                    print(f'  {records[-1]}', file=sys.stderr, flush=True)
            del model, optim
    return records
