"""Memory per GPU of each stage under the config's strategy, before renting GPUs.

An estimate from the architecture (``config.json`` of the checkpoint when it is
on this machine, else the published values in :data:`PUBLISHED`), the stage's
trainable parts and dtypes (:mod:`dpa.engine.precision`), the per-device batch
and length, and the strategy:

- DDP: every GPU holds all weights, and the gradients and AdamW's two states
  of the trainable ones.
- FSDP2: weights, gradients and optimizer states divided by the GPUs, plus
  the unsharded working set: two decoder layers (the one computing and the
  one prefetched) and the root (embeddings, LM head, projector), in the
  compute dtype.
- DeepSpeed ZeRO-2 (bf16): bf16 weights on every GPU; float32 master weights,
  optimizer states and bf16 gradients divided by the GPUs, plus the reduce
  bucket.

Activations (bytes per token and layer, in the compute dtype): without
checkpointing every layer keeps about ``8 h + 2 kv + 4 i`` values per token
(norm outputs, q/k/v, attention output, residuals, the MLP's gate, up, product;
flash/sdpa attention keeps no T x T scores); with checkpointing a layer keeps
its input (``h``) and one layer at a time is recomputed in full. The loss adds
its float32 logits: ``loss_chunk_size`` rows at a time (x3: logits, softmax,
gradient). LoRA adds, per adapted linear layer and token, its ``r`` values of
``A x`` and, with ``lora_dropout > 0``, the dropped-out copy of the layer's
input (PEFT's dropout is not in place); the backward still runs through every
frozen layer (to reach the adapters below it), so the activations above are
kept as for a full fine-tune. The frozen vision tower runs without gradient and is not counted;
nor are the CUDA context and allocator fragmentation, hence :data:`HEADROOM`.
"""
import os.path as osp
from typing import Dict, List, Optional

from dpa.engine.precision import ALWAYS_FLOAT32

GB = 1024 ** 3
# Share of a GPU's memory the plan lets a stage use: the rest is the CUDA
# context, allocator fragmentation and temporaries the estimate leaves out.
HEADROOM = 0.9
DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}
ADAMW_STATES = 2

# Published config.json values of the checkpoints the full configs name, by
# the checkpoint directory's name (used when it is not on this machine).
PUBLISHED = {
    'Qwen2.5-1.5B-Instruct': dict(hidden_size=1536, num_hidden_layers=28,
                                  intermediate_size=8960, num_attention_heads=12,
                                  num_key_value_heads=2, vocab_size=151936,
                                  tie_word_embeddings=True, attention_bias=True),
    'Qwen2.5-3B-Instruct': dict(hidden_size=2048, num_hidden_layers=36, intermediate_size=11008,
                                num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                tie_word_embeddings=True, attention_bias=True),
    'Qwen2.5-7B-Instruct': dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                tie_word_embeddings=False, attention_bias=True),
    'Qwen2.5-14B-Instruct': dict(hidden_size=5120, num_hidden_layers=48,
                                 intermediate_size=13824, num_attention_heads=40,
                                 num_key_value_heads=8, vocab_size=152064,
                                 tie_word_embeddings=False, attention_bias=True),
    'Qwen2.5-32B-Instruct': dict(hidden_size=5120, num_hidden_layers=64,
                                 intermediate_size=27648, num_attention_heads=40,
                                 num_key_value_heads=8, vocab_size=152064,
                                 tie_word_embeddings=False, attention_bias=True),
    'Llama-3.1-8B-Instruct': dict(hidden_size=4096, num_hidden_layers=32,
                                  intermediate_size=14336, num_attention_heads=32,
                                  num_key_value_heads=8, vocab_size=128256,
                                  tie_word_embeddings=False),
    'internlm2-chat-7b': dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=92544,
                              tie_word_embeddings=False),
    'gemma-2-9b-it': dict(hidden_size=3584, num_hidden_layers=42, intermediate_size=14336,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                          vocab_size=256000, tie_word_embeddings=True),
    'clip-vit-large-patch14-336': dict(hidden_size=1024, num_hidden_layers=24,
                                       intermediate_size=4096, image_size=336, patch_size=14),
    'siglip-so400m-patch14-384': dict(hidden_size=1152, num_hidden_layers=27,
                                      intermediate_size=4304, image_size=384, patch_size=14),
}


class UnknownArchitecture(ValueError):
    """Neither a checkpoint on this machine nor a published entry gives the sizes."""


def architecture(part: dict, text: bool = True) -> dict:
    """The sizes of a model part: its checkpoint's config when the directory
    (or the packaged ONNX file) exists, its stand-in ``config``, or
    :data:`PUBLISHED` by directory name."""
    from dpa.models.builders import hf_config  # transformers: only when a config is read
    from dpa.models.gguf import gguf_path
    from dpa.models.onnx_vision import backbone_state_dict, dinov2_config, is_onnx_file
    pretrained, config = part.get('pretrained'), part.get('config')
    gguf = gguf_path(pretrained, part.get('gguf_file'))
    onnx = config is None and is_onnx_file(pretrained) and osp.isfile(pretrained)
    if config is not None or gguf is not None or onnx or (pretrained is not None
                                                          and osp.isdir(pretrained)):
        if onnx:  # a packaged ONNX backbone: its sizes from its tensors, nothing converted
            cfg = dinov2_config(backbone_state_dict(pretrained))
        else:
            cfg = hf_config(None if config is not None else pretrained, config,
                            part.get('trust_remote_code', False), part.get('gguf_file'))
        cfg = cfg.get_text_config() if text else (getattr(cfg, 'vision_config', None) or cfg)
        return {key: getattr(cfg, key, None) for key in (
            'hidden_size', 'num_hidden_layers', 'intermediate_size', 'num_attention_heads',
            'num_key_value_heads', 'head_dim', 'vocab_size', 'tie_word_embeddings',
            'attention_bias', 'image_size', 'patch_size', 'model_type')}
    name = osp.basename(str(pretrained).rstrip('/'))
    if name not in PUBLISHED:
        raise UnknownArchitecture(f'{pretrained!r} is not on this machine and {name!r} is not '
                                  'in dpa.engine.memory_plan.PUBLISHED: point the path at the '
                                  'checkpoint (its config.json is read, no weights)')
    return dict(PUBLISHED[name])


def _linear_shapes(arch: dict) -> List[tuple]:
    """(in, out) of every linear layer of one decoder layer."""
    h, i = arch['hidden_size'], arch['intermediate_size']
    heads = arch['num_attention_heads']
    head_dim = arch.get('head_dim') or h // heads
    kv = (arch.get('num_key_value_heads') or heads) * head_dim
    q = heads * head_dim
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def llm_parameters(arch: dict) -> Dict[str, int]:
    """Parameters of a decoder-only LLM: per layer, and the root (embeddings,
    LM head unless tied, final norm)."""
    h = arch['hidden_size']
    layer = sum(a * b for a, b in _linear_shapes(arch)) + 2 * h
    if arch.get('attention_bias') or arch.get('model_type') == 'qwen2':
        layer += sum(out for _, out in _linear_shapes(arch)[:3])
    embeddings = arch['vocab_size'] * h
    root = embeddings * (1 if arch.get('tie_word_embeddings') else 2) + h
    return dict(layer=layer, layers=arch['num_hidden_layers'], root=root,
                total=layer * arch['num_hidden_layers'] + root)


# The names of the linear layers of :func:`_linear_shapes`, in its order
# (Llama, Qwen2, Gemma-2, Mistral ...).
LINEAR_NAMES = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


def lora_shapes(arch: dict, target_modules='all-linear') -> List[tuple]:
    """(in, out) of the linear layers of one decoder layer that LoRA adapts:
    every one for ``'all-linear'``, else those named in ``target_modules``."""
    shapes = _linear_shapes(arch)
    if target_modules == 'all-linear':
        return shapes
    if target_modules is None or isinstance(target_modules, str):
        raise UnknownArchitecture(
            f'lora.target_modules={target_modules!r}: the plan counts LoRA for '
            f"'all-linear' or a list among {LINEAR_NAMES}")
    unknown = set(target_modules) - set(LINEAR_NAMES)
    if unknown:
        raise UnknownArchitecture(f'lora.target_modules names {sorted(unknown)}: the plan knows '
                                  f'the linear layers {LINEAR_NAMES}')
    return [shape for name, shape in zip(LINEAR_NAMES, shapes) if name in target_modules]


def lora_parameters(arch: dict, rank: int, target_modules='all-linear') -> int:
    """LoRA's A and B of every adapted linear layer of the decoder."""
    per_layer = sum(rank * (a + b) for a, b in lora_shapes(arch, target_modules))
    return per_layer * arch['num_hidden_layers']


def _lora_activation_bytes(arch: dict, tokens: int, compute_bytes: int, lora: dict,
                           checkpointing: bool) -> float:
    """What LoRA keeps for the backward beyond the frozen layers' activations."""
    shapes = lora_shapes(arch, lora.get('target_modules', 'all-linear'))
    values = len(shapes) * lora.get('r', 8)
    if lora.get('lora_dropout', 0.0) > 0:
        values += sum(a for a, _ in shapes)  # the dropped-out inputs
    per_layer = tokens * values * compute_bytes
    return per_layer * (1 if checkpointing else arch['num_hidden_layers'])


def vision_parameters(arch: dict) -> int:
    """A CLIP vision tower (exact); SigLIP's differs by its pooling head."""
    h, i = arch['hidden_size'], arch['intermediate_size']
    layer = 4 * h * h + 4 * h + 2 * h * i + h + i + 4 * h
    patches = (arch['image_size'] // arch['patch_size']) ** 2
    # patch projection, positions (+ class token), class embedding, pre/post norms
    embeddings = 3 * arch['patch_size'] ** 2 * h + (patches + 1) * h + h + 4 * h
    return layer * arch['num_hidden_layers'] + embeddings


def projector_parameters(vision_dim: int, llm_dim: int) -> int:
    """``mlp2x_gelu``: two linear layers with biases."""
    return vision_dim * llm_dim + llm_dim + llm_dim * llm_dim + llm_dim


def _activation_bytes(arch: dict, tokens: int, compute_bytes: int, checkpointing: bool,
                      chunk: Optional[int]) -> float:
    h, i = arch['hidden_size'], arch['intermediate_size']
    kv = _linear_shapes(arch)[1][1]
    full_layer = tokens * (8 * h + 2 * kv + 4 * i) * compute_bytes
    layers = arch['num_hidden_layers']
    if checkpointing:
        kept = tokens * h * compute_bytes * layers + full_layer
    else:
        kept = full_layer * layers
    logits_rows = min(chunk, tokens) if chunk else tokens
    return kept + 3 * logits_rows * arch['vocab_size'] * 4


def plan_stage(cfg, stage: str, gpus: int, trainable: List[str]) -> dict:
    """Estimated bytes per GPU of one stage (see the module's docstring).

    Args:
        cfg: the pipeline config.
        stage: the stage's name.
        gpus: processes (one per GPU).
        trainable: the stage's trainable parts.

    Returns:
        dict of ``weights``, ``gradients``, ``optimizer``, ``activations``
        (with the configured checkpointing), ``activations_checkpointed``,
        ``activations_full``, ``total`` (bytes) and ``strategy``.
    """
    recipe = cfg[stage]
    llm_arch = architecture(cfg.llm)
    llm = llm_parameters(llm_arch)
    loaded = DTYPE_BYTES[cfg.llm.get('torch_dtype', 'float32')]
    precision = cfg.get('mixed_precision')
    compute = DTYPE_BYTES[precision] if precision else 4
    master = 4 if cfg.get('trainable_dtype') == 'float32' else None

    # (count, bytes each) of trainable and frozen parameters.
    frozen = [(llm['total'], loaded)]
    train_count, train_bytes = 0, master or loaded
    if 'llm' in trainable:
        frozen, train_count = [], llm['total']
    lora = None
    if 'lora' in trainable or stage == 'proxy':
        lora = recipe.get('lora') or {}
        train_count += lora_parameters(llm_arch, lora.get('r', 8),
                                       lora.get('target_modules', 'all-linear'))
        train_bytes = 4  # PEFT keeps adapters in float32 (see ALWAYS_FLOAT32)
    if stage != 'proxy' and cfg.get('vision_tower') is not None:
        vision_arch = architecture(cfg.vision_tower, text=False)
        vision_dtype = DTYPE_BYTES[cfg.vision_tower.get('torch_dtype', 'float32')]
        frozen.append((vision_parameters(vision_arch), vision_dtype))
        train_count += projector_parameters(vision_arch['hidden_size'],
                                            llm_arch['hidden_size'])
        if 'projector' in ALWAYS_FLOAT32 and 'llm' not in trainable:
            train_bytes = 4
    frozen_bytes = sum(count * size for count, size in frozen)

    strategy = (cfg.get('strategy') or {}).get('type', 'DDP')
    if strategy == 'DeepSpeedStrategy':
        zero = (cfg.strategy.get('zero_optimization') or {}).get('stage', 0)
        strategy = f'ZeRO-{zero}'
    shards = gpus if strategy in ('FSDP2Strategy', 'ZeRO-3') else 1
    if strategy == 'ZeRO-2':
        weights = frozen_bytes + train_count * 2 + train_count * 4 / gpus
        gradients = train_count * 2 / gpus + 2 * cfg.strategy.zero_optimization.get(
            'reduce_bucket_size', 5e8)
    else:
        weights = (frozen_bytes + train_count * train_bytes) / shards
        gradients = train_count * train_bytes / shards
        if shards > 1:  # the gathered working set, in the compute dtype
            weights += (2 * llm['layer'] + llm['root']) * compute
            gradients += llm['layer'] * 4 if 'llm' in trainable else 0
    optim_divisor = gpus if strategy in ('FSDP2Strategy', 'ZeRO-2', 'ZeRO-3') else 1
    optimizer = train_count * ADAMW_STATES * (4 if strategy.startswith('ZeRO')
                                              else train_bytes) / optim_divisor

    tokens = recipe.batch_size * recipe.max_length
    chunk = cfg.model.get('loss_chunk_size', 512)
    with_ckpt = _activation_bytes(llm_arch, tokens, compute, True, chunk)
    without = _activation_bytes(llm_arch, tokens, compute, False, chunk)
    if lora is not None:
        with_ckpt += _lora_activation_bytes(llm_arch, tokens, compute, lora, True)
        without += _lora_activation_bytes(llm_arch, tokens, compute, lora, False)
    checkpointing = cfg.model.get('gradient_checkpointing', False)
    activations = with_ckpt if checkpointing else without
    return dict(strategy=strategy, weights=weights, gradients=gradients, optimizer=optimizer,
                activations=activations, activations_checkpointed=with_ckpt,
                activations_full=without, checkpointing=checkpointing,
                total=weights + gradients + optimizer + activations,
                trainable_parameters=train_count, llm_parameters=llm['total'])


def plan(cfg, gpus: int, trainable: Dict[str, List[str]]) -> Dict[str, dict]:
    """:func:`plan_stage` for every stage of ``trainable``."""
    return {stage: plan_stage(cfg, stage, gpus, parts) for stage, parts in trainable.items()}


def format_count(count: float) -> str:
    """A parameter count in a few characters: 7.62B, 323.0M, 41.5K."""
    for unit, size in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if count >= size:
            return f'{count / size:.{2 if unit == "B" else 1}f}{unit}'
    return str(int(count))


def format_plan(plans: Dict[str, dict], gpus: int, gpu_memory_gb: float) -> str:
    """A table of the plan: per stage the parameters it trains, the memory,
    and whether it fits ``HEADROOM`` of a GPU."""
    budget = gpu_memory_gb * HEADROOM
    lines = [f'{"stage":<9}{"strategy":<15}{"trains":>9}{"weights":>9}{"grads":>8}{"optim":>8}'
             f'{"act(ckpt)":>11}{"act(full)":>11}{"total":>8}  fits {gpus} x {gpu_memory_gb:g} GB '
             f'(uses <= {budget:.0f} GB)']
    for stage, p in plans.items():
        fits = p['total'] / GB <= budget
        lines.append(
            f'{stage:<9}{p["strategy"]:<15}{format_count(p["trainable_parameters"]):>9}'
            f'{p["weights"] / GB:>9.1f}{p["gradients"] / GB:>8.1f}'
            f'{p["optimizer"] / GB:>8.1f}{p["activations_checkpointed"] / GB:>11.1f}'
            f'{p["activations_full"] / GB:>11.1f}{p["total"] / GB:>8.1f}  '
            f'{"yes" if fits else "NO"}'
            f'{"" if p["checkpointing"] else " (no activation checkpointing)"}')
    return '\n'.join(lines)
