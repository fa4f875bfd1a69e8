"""The proxy LLM of DPA stage 1 (PMO): the LLM with a PEFT LoRA adapter."""
from typing import Optional

from peft import LoraConfig, PeftModel, get_peft_model

from dpa.registry import MODELS


@MODELS.register_module()
def ProxyLLMWrapper(llm: dict, lora: Optional[dict] = None, adapter: Optional[str] = None):
    """Build the LLM of ``llm`` (a config of a registered LLM builder) with LoRA.

    Args:
        llm: config of the base LLM, e.g. ``dict(type='HFCausalLM', pretrained=...)``.
        lora: ``peft.LoraConfig`` keyword arguments: a fresh adapter to train
            (stage 1). ``target_modules='all-linear'`` adapts every linear layer
            of the LLM but ``lm_head``.
        adapter: directory of a trained adapter (stage 1's artifact): it is
            loaded and merged into the base weights, giving a plain
            transformers model (stages 2 and 3).

    Returns:
        A ``PeftModel`` when ``lora`` is given, else the merged transformers model.
    """
    if (lora is None) == (adapter is None):
        raise ValueError('ProxyLLMWrapper needs exactly one of `lora` (train a new adapter) '
                         'or `adapter` (merge a trained one)')
    base = MODELS.build(llm)
    if lora is not None:
        check_lora(lora)
        return get_peft_model(base, LoraConfig(task_type='CAUSAL_LM', **lora))
    return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def check_lora(lora: dict, key: str = 'lora') -> None:
    """Fail early, naming the key, on a LoRA setting PEFT would reject late."""
    rank = lora.get('r', 8)
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f'{key}.r must be a positive integer (the paper uses 256), got {rank!r}')
    if lora.get('lora_alpha', 8) <= 0:
        raise ValueError(f"{key}.lora_alpha must be positive, got {lora.get('lora_alpha')!r}")
