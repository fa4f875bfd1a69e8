"""Fields of a transformers-5 LLaVA export written a second time in the form
transformers 4.x reads (measured with 4.57, see PLATFORM notes).

5.x reads both forms; without them 4.57 loads the export with the vision tower
randomly initialised (5.x stores ``vision_tower.embeddings.*``, 4.x expects
``vision_tower.vision_model.*``), uses rope theta 10000 instead of the
LLM's (5.x keeps it inside ``rope_parameters`` only), and fails to build the
tokenizer (``TokenizersBackend`` class, ``extra_special_tokens`` as a list).
"""
import json
import os
import os.path as osp

from safetensors import safe_open
from safetensors.torch import save_file

# Vision classes whose 4.x version wrapped its modules in ``vision_model``
# (5.x removes the prefix when loading, see its conversion mapping).
LEGACY_VISION_PREFIX = {'CLIPVisionModel': 'vision_model.', 'SiglipVisionModel': 'vision_model.'}
SAFETENSORS_INDEX = 'model.safetensors.index.json'


def write_transformers4_fields(out_dir: str, vision_model) -> None:
    """Rewrite a saved LLaVA directory so 4.57 and 5.x both load it exactly."""
    prefix = LEGACY_VISION_PREFIX.get(type(vision_model).__name__)
    if prefix:
        _rename_weights(out_dir, 'vision_tower.', 'vision_tower.' + prefix)
    _update_json(osp.join(out_dir, 'config.json'), _legacy_rope)
    _update_json(osp.join(out_dir, 'tokenizer_config.json'), _legacy_tokenizer_fields)
    _write_preprocessor_config(out_dir)


def _update_json(path: str, change) -> None:
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    change(data)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write('\n')


def _legacy_rope(config: dict) -> None:
    text = config['text_config']
    rope = text.get('rope_parameters') or {}
    if 'rope_theta' in rope:
        text['rope_theta'] = rope['rope_theta']
    if rope.get('rope_type', 'default') != 'default':
        text['rope_scaling'] = {k: v for k, v in rope.items() if k != 'rope_theta'}


def _legacy_tokenizer_fields(config: dict) -> None:
    if config.get('tokenizer_class') == 'TokenizersBackend':
        # 5.x aliases the 4.x name to TokenizersBackend.
        config['tokenizer_class'] = 'PreTrainedTokenizerFast'
    # 4.x's generic tokenizer also returns token_type_ids unless told, and
    # LLaVA's generate() refuses them.
    config.setdefault('model_input_names', ['input_ids', 'attention_mask'])
    extra = config.get('extra_special_tokens')
    if isinstance(extra, list):
        # A list means "more special tokens" to 5.x and breaks 4.x, which
        # reads that list as `additional_special_tokens` (5.x does too).
        config['additional_special_tokens'] = extra
        del config['extra_special_tokens']


def _write_preprocessor_config(out_dir: str) -> None:
    """4.x reads the image processor from its own file, 5.x from the
    processor's; both hold the same settings."""
    with open(osp.join(out_dir, 'processor_config.json'), encoding='utf-8') as f:
        image_processor = json.load(f).get('image_processor')
    if image_processor is not None:
        with open(osp.join(out_dir, 'preprocessor_config.json'), 'w', encoding='utf-8') as f:
            json.dump(image_processor, f, indent=2, sort_keys=True)
            f.write('\n')


def _rename_weights(out_dir: str, old: str, new: str) -> None:
    """Rename tensor keys starting with ``old`` in every safetensors file of
    ``out_dir`` (and in the shard index of a sharded save)."""
    def rename(key):
        return new + key[len(old):] if key.startswith(old) else key

    for name in sorted(os.listdir(out_dir)):
        if not name.endswith('.safetensors'):
            continue
        path = osp.join(out_dir, name)
        with safe_open(path, framework='pt') as f:
            metadata = f.metadata()
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, path, metadata=metadata)
    index = osp.join(out_dir, SAFETENSORS_INDEX)
    if osp.exists(index):
        _update_json(index, lambda data: data.update(
            weight_map={rename(k): v for k, v in data['weight_map'].items()}))
