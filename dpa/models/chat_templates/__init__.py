"""The chat templates and special tokens of the instruction-tuned LLM families
the configs cover, as their tokenizers ship them.

The templates (``<family>.jinja``) are the public Jinja text of each family's
``tokenizer_config.json``. They live here so that a tiny stand-in tokenizer
renders conversations exactly as the real checkpoint does, and so that tests
check stage-3 tokenisation against the real formats without a model hub.
"""
import os.path as osp
from dataclasses import dataclass
from typing import Optional, Tuple

TEMPLATE_DIR = osp.dirname(osp.abspath(__file__))


@dataclass(frozen=True)
class ChatFamily:
    """The tokens a family's tokenizer declares special.

    Args:
        bos / eos / pad: the tokenizer's ``bos_token`` / ``eos_token`` /
            ``pad_token`` (None where the family has none).
        end_of_turn: the token the chat template closes an assistant turn
            with, which stage 3 learns after every answer.
        special_tokens: every special token the template writes, plus the
            family's bos/eos/pad, in the family's id order.
        roles: role names the template writes after its turn marker.
    """
    bos: Optional[str]
    eos: str
    pad: Optional[str]
    end_of_turn: str
    special_tokens: Tuple[str, ...]
    roles: Tuple[str, ...]


FAMILIES = {
    # Qwen/Qwen2.5-*-Instruct: ChatML with a default system prompt, no BOS.
    'qwen2_5': ChatFamily(
        bos=None, eos='<|im_end|>', pad='<|endoftext|>', end_of_turn='<|im_end|>',
        special_tokens=('<|endoftext|>', '<|im_start|>', '<|im_end|>'),
        roles=('system', 'user', 'assistant', 'tool')),
    # meta-llama/Llama-3.1-*-Instruct: header-delimited turns, a dated system header.
    'llama3_1': ChatFamily(
        bos='<|begin_of_text|>', eos='<|eot_id|>', pad=None, end_of_turn='<|eot_id|>',
        special_tokens=('<|begin_of_text|>', '<|end_of_text|>', '<|finetune_right_pad_id|>',
                        '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>',
                        '<|python_tag|>'),
        roles=('system', 'user', 'assistant', 'ipython')),
    # google/gemma-2-*-it: no system role, the assistant is called "model".
    'gemma2': ChatFamily(
        bos='<bos>', eos='<eos>', pad='<pad>', end_of_turn='<end_of_turn>',
        special_tokens=('<pad>', '<eos>', '<bos>', '<start_of_turn>', '<end_of_turn>'),
        roles=('user', 'model')),
    # internlm/internlm2-chat-*: ChatML after a BOS.
    'internlm2': ChatFamily(
        bos='<s>', eos='</s>', pad='</s>', end_of_turn='<|im_end|>',
        special_tokens=('<s>', '</s>', '<|im_start|>', '<|im_end|>', '<|action_start|>',
                        '<|action_end|>', '<|interpreter|>', '<|plugin|>'),
        roles=('system', 'user', 'assistant')),
}


def chat_family(name: str) -> ChatFamily:
    if name not in FAMILIES:
        raise ValueError(f'unknown chat family {name!r}; choose among {sorted(FAMILIES)}')
    return FAMILIES[name]


def load_chat_template(name: str) -> str:
    """The family's chat template, character for character as its tokenizer
    ships it (the file's final newline is not part of it)."""
    chat_family(name)
    with open(osp.join(TEMPLATE_DIR, f'{name}.jinja'), encoding='utf-8') as f:
        return f.read().removesuffix('\n')
