"""The LLM with PEFT LoRA: the proxy LLM of DPA stage 1 (PMO), and the
low-memory stage 3 (``finetune.lora``), which trains LoRA adapters on the
original LLM and writes a merged model."""
from typing import Optional

from peft import LoraConfig, PeftModel, get_peft_model

from dpa.registry import MODELS

# Where the adapter of a LoRA stage 3 is saved inside the final model's artifact.
FINETUNE_ADAPTER_DIR = 'adapter'


@MODELS.register_module()
def ProxyLLMWrapper(llm: dict, lora: Optional[dict] = None, adapter: Optional[str] = None):
    """Build the LLM of ``llm`` (a config of a registered LLM builder) with LoRA.

    Args:
        llm: config of the base LLM, e.g. ``dict(type='HFCausalLM', pretrained=...)``.
        lora: ``peft.LoraConfig`` keyword arguments: a fresh adapter to train
            (stage 1; stage 3 with ``finetune.lora``). ``target_modules='all-linear'``
            adapts every linear layer of the LLM but ``lm_head``.
        adapter: directory of a trained adapter (stage 1's artifact): it is
            loaded and merged into the base weights, giving a plain
            transformers model (stages 2 and 3). With ``lora`` too (stage 3
            from the proxy, with LoRA), the fresh adapter goes on the merged
            model.

    Returns:
        A ``PeftModel`` when ``lora`` is given, else the merged transformers model.
    """
    if lora is None and adapter is None:
        raise ValueError('ProxyLLMWrapper needs `lora` (train a new adapter), `adapter` '
                         '(merge a trained one) or both')
    model = MODELS.build(llm)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if lora is not None:
        check_lora(lora)
        model = get_peft_model(model, LoraConfig(task_type='CAUSAL_LM', **lora))
    return model


def has_lora(llm) -> bool:
    """Whether ``llm`` carries trainable PEFT adapters (unmerged)."""
    return isinstance(llm, PeftModel)


def merge_lora(model) -> None:
    """Fold the LoRA adapters of ``model.llm`` (a ``PeftModel``) into its base
    weights, in place: ``model.llm`` becomes the plain transformers model that
    every reader of a final model loads. W' = W + (alpha / r) B A, computed
    by PEFT in the base weight's dtype."""
    model.llm = model.llm.merge_and_unload()


def check_lora(lora: dict, key: str = 'lora') -> None:
    """Fail early, naming the key, on a LoRA setting PEFT would reject late."""
    if not isinstance(lora, dict):
        raise ValueError(f'{key} must be a dict of peft.LoraConfig arguments, got {lora!r}')
    rank = lora.get('r', 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f'{key}.r must be a positive integer (the paper uses 256), got {rank!r}')
    alpha = lora.get('lora_alpha', 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{key}.lora_alpha must be positive, got {alpha!r}")
    dropout = lora.get('lora_dropout', 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
            not 0 <= dropout < 1:
        raise ValueError(f'{key}.lora_dropout must be in [0, 1), got {dropout!r}')
    unknown = set(lora) - set(LoraConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f'{key} has keys peft.LoraConfig does not know: {sorted(unknown)}')
