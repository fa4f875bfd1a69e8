"""InternLM2 (internlm/internlm2-chat-*) as the project's own transformers-5
model and tokenizer.

Importing this package registers ``model_type='internlm2'`` with
``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``, so a published
checkpoint loads with ``trust_remote_code=False`` without running its own
``.py`` files; with ``trust_remote_code=True`` transformers runs the
checkpoint's code instead (docs/families.md says what breaks then).
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_internlm2 import InternLM2Config, legacy_internlm2_config
from .modeling_internlm2 import InternLM2ForCausalLM, InternLM2Model
from .tokenization_internlm2 import (InternLM2Tokenizer, check_sentencepiece_ids,
                                     is_internlm2_tokenizer_dir)

AutoConfig.register(InternLM2Config.model_type, InternLM2Config, exist_ok=True)
AutoModel.register(InternLM2Config, InternLM2Model, exist_ok=True)
AutoModelForCausalLM.register(InternLM2Config, InternLM2ForCausalLM, exist_ok=True)

__all__ = ['InternLM2Config', 'InternLM2ForCausalLM', 'InternLM2Model', 'InternLM2Tokenizer',
           'check_sentencepiece_ids', 'is_internlm2_tokenizer_dir', 'legacy_internlm2_config']
