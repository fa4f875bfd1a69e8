"""The final model's two on-disk forms: the project's native directory
(``save_native``/``load_native``) and the transformers LLaVA export
(``export_llava``), checked against the in-memory model on tiny random models."""
import json
import os
import shutil
import string

import numpy as np
import pytest
import torch
import transformers
from mmengine.config import Config
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import dpa  # noqa: F401  (registers everything)
from dpa.datasets.llava import LLaVADataset
from dpa.engine.standin import TINY_LLM
from dpa.models.builders import IMAGE_TOKEN, PROCESSORS, hf_config
from dpa.models.export import (NATIVE_CONFIG, export_llava, load_native, native_image_processor,
                               save_native, tokenizer_round_trip_problems)
from dpa.models.export_base import (MULTIMODAL_PRELUDE, ExportMismatch, ExportUnsupported,
                                    end_of_turn_ids, generation_config, training_image_processor)
from dpa.models.image_preprocessing import preprocess_image
from dpa.models.mllm import LlavaDPAModel
from dpa.models.tiny_tokenizer import CHAT_TEMPLATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN2 = Config.fromfile(os.path.join(ROOT, 'configs/_base_/models/tiny_qwen2.py'))
CLIP = Config.fromfile(os.path.join(ROOT, 'configs/_base_/models/tiny_clip.py'))
TINY_TOKENIZER = dict(type='TinyTokenizer')
QUESTION = 'What colour is the shape?'
MESSAGES = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': QUESTION}]}]
EXPECTED_PROMPT = ('<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n'
                   '<|im_start|>assistant\n')
NUM_PATCHES = (32 // 8) ** 2  # tiny CLIP: 32 px images, 8 px patches


def qwen2_cfg(**overrides):
    cfg = QWEN2.llm.to_dict()
    cfg['config'] = {**cfg['config'], **overrides}
    return cfg


def llama_cfg(**overrides):
    config = dict(model_type='llama', vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=True)
    return dict(type='HFCausalLM', config={**config, **overrides}, torch_dtype='float32')


def clip_cfg(**overrides):
    return {**CLIP.vision_tower.to_dict(), **overrides}


def build_model(llm, tokenizer=TINY_TOKENIZER, vision_tower=None, projector='mlp2x_gelu',
                seed=1):
    model = LlavaDPAModel(llm=llm, tokenizer=tokenizer,
                          vision_tower=vision_tower or clip_cfg(),
                          projector=dict(type=projector), trainable=['llm', 'projector'])
    # A freshly initialised projector is close to trivial: make the image matter.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.projector.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model.eval()


def shape_image(colour='red', size=(40, 48)):
    image = Image.new('RGB', size, 'white')
    ImageDraw.Draw(image).ellipse((8, 10, 30, 36), fill=colour)
    # A little seeded noise so every patch differs.
    noise = np.random.RandomState(0).randint(0, 24, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(np.asarray(image) - noise)


@pytest.fixture(scope='module')
def tokenizer():
    return PROCESSORS.build(TINY_TOKENIZER)


@pytest.fixture(scope='module')
def image_processor():
    return PROCESSORS.build(CLIP.image_processor.to_dict())


def load_export(out_dir):
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(out_dir)
    return hf, processor


def processor_inputs(processor, image):
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return text, processor(text=text, images=[image], return_tensors='pt')


def our_logits(model, inputs):
    with torch.no_grad():
        return model(inputs['input_ids'], inputs['attention_mask'],
                     pixel_values=inputs['pixel_values'], mode='tensor')


def hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs).logits


def assert_close(actual, expected, atol=1e-5):
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f'max abs difference {diff}'


# --------------------------------------------------------------------------- #
# Export of the default tiny Qwen2 + CLIP model
# --------------------------------------------------------------------------- #

@pytest.fixture(scope='module')
def qwen2_export(tmp_path_factory, tokenizer, image_processor):
    model = build_model(qwen2_cfg())
    out_dir = str(tmp_path_factory.mktemp('export') / 'hf')
    export_llava(model, tokenizer, image_processor, out_dir)
    hf, processor = load_export(out_dir)
    text, inputs = processor_inputs(processor, shape_image())
    return dict(model=model, hf=hf, processor=processor, text=text, inputs=inputs,
                out_dir=out_dir)


def test_export_directory_holds_model_and_processor(qwen2_export):
    files = set(os.listdir(qwen2_export['out_dir']))
    assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= files
    hf, processor = qwen2_export['hf'], qwen2_export['processor']
    assert isinstance(processor, transformers.LlavaProcessor)
    config = hf.config
    assert config.image_token_id == qwen2_export['model'].image_token_id == 3
    assert config.vision_feature_select_strategy == 'default'
    assert config.vision_feature_layer == -2
    assert config.text_config.model_type == 'qwen2'
    assert config.vision_config.model_type == 'clip_vision_model'
    assert config.text_config.vocab_size == 512
    assert not config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    assert processor.patch_size == 8 and processor.num_additional_image_tokens == 1
    assert processor.chat_template.startswith(MULTIMODAL_PRELUDE)


def test_exported_weights_are_the_models(qwen2_export):
    model, hf = qwen2_export['model'], qwen2_export['hf']
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight,
                       model.projector.linear_1.weight)
    assert torch.equal(hf.model.multi_modal_projector.linear_2.bias,
                       model.projector.linear_2.bias)
    assert torch.equal(hf.lm_head.weight, model.llm.lm_head.weight)
    assert torch.equal(hf.get_input_embeddings().weight, model.llm.get_input_embeddings().weight)
    ours = model.vision_tower.model.state_dict()
    theirs = hf.model.vision_tower.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_processor_renders_multimodal_messages_with_the_llm_template(qwen2_export, tokenizer):
    text = qwen2_export['text']
    assert text == EXPECTED_PROMPT
    flattened = tokenizer.apply_chat_template(
        [{'role': 'user', 'content': IMAGE_TOKEN + '\n' + QUESTION}],
        add_generation_prompt=True, tokenize=False)
    assert text == flattened
    # Plain string content still renders as before.
    plain = qwen2_export['processor'].apply_chat_template(
        [{'role': 'user', 'content': 'hello'}], add_generation_prompt=False)
    assert plain == '<|im_start|>user\nhello<|im_end|>\n'


def test_processor_expands_image_and_preprocesses_like_ours(qwen2_export, tokenizer,
                                                            image_processor):
    inputs = qwen2_export['inputs']
    ids = inputs['input_ids'][0]
    image_id = qwen2_export['model'].image_token_id
    positions = (ids == image_id).nonzero().squeeze(-1)
    assert positions.numel() == NUM_PATCHES
    assert torch.equal(positions, positions[0] + torch.arange(NUM_PATCHES))  # contiguous
    expanded = EXPECTED_PROMPT.replace(IMAGE_TOKEN, IMAGE_TOKEN * NUM_PATCHES)
    assert ids.tolist() == tokenizer(expanded, add_special_tokens=False)['input_ids']
    assert torch.equal(inputs['attention_mask'], torch.ones_like(inputs['input_ids']))
    ours = image_processor(shape_image(), return_tensors='pt')['pixel_values']
    assert inputs['pixel_values'].shape == (1, 3, 32, 32)
    assert torch.equal(inputs['pixel_values'], ours)


def test_exported_logits_equal_ours(qwen2_export):
    hf, inputs = qwen2_export['hf'], qwen2_export['inputs']
    expected = our_logits(qwen2_export['model'], inputs)
    actual = hf_logits(hf, inputs)
    assert actual.dtype == expected.dtype == torch.float32
    assert_close(actual, expected)
    # The comparison is not blind to the image: another image changes the logits.
    _, other = processor_inputs(qwen2_export['processor'], shape_image('blue', (32, 32)))
    assert (hf_logits(hf, other) - actual).abs().max() > 1e-2


def test_exported_model_generates_like_ours(qwen2_export):
    hf, model, inputs = qwen2_export['hf'], qwen2_export['model'], qwen2_export['inputs']
    prompt_len = inputs['input_ids'].shape[1]
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt_len + 5)
    assert torch.equal(out[:, :prompt_len], inputs['input_ids'])
    new = out[0, prompt_len:]
    assert int(new[0]) == int(our_logits(model, inputs)[0, -1].argmax())
    # Our own greedy loop (no cache) gives the same five tokens.
    ids = inputs['input_ids']
    for _ in range(5):
        step = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    pixel_values=inputs['pixel_values'])
        next_id = our_logits(model, step)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(out, ids)


# --------------------------------------------------------------------------- #
# Other LLM families and vision feature choices
# --------------------------------------------------------------------------- #

def test_export_llama_with_tied_embeddings(tmp_path, tokenizer, image_processor):
    model = build_model(llama_cfg(tie_word_embeddings=True))
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight
    export_llava(model, tokenizer, image_processor, str(tmp_path / 'hf'))
    stored = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
    assert not any(k.startswith('lm_head') for k in stored)  # tied: stored once
    hf, processor = load_export(str(tmp_path / 'hf'))
    assert hf.config.tie_word_embeddings
    assert hf.config.text_config.model_type == 'llama'
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    text, inputs = processor_inputs(processor, shape_image())
    assert text == EXPECTED_PROMPT
    assert_close(hf_logits(hf, inputs), our_logits(model, inputs))


def test_export_full_features_keeps_cls_token(tmp_path, tokenizer, image_processor):
    model = build_model(qwen2_cfg(), vision_tower=clip_cfg(feature_select='full',
                                                           feature_layer=-1))
    export_llava(model, tokenizer, image_processor, str(tmp_path / 'hf'))
    hf, processor = load_export(str(tmp_path / 'hf'))
    assert hf.config.vision_feature_select_strategy == 'full'
    assert hf.config.vision_feature_layer == -1
    _, inputs = processor_inputs(processor, shape_image())
    assert int((inputs['input_ids'] == model.image_token_id).sum()) == NUM_PATCHES + 1
    assert_close(hf_logits(hf, inputs), our_logits(model, inputs))


def test_export_folds_the_feature_scale_into_the_projector(tmp_path, tokenizer, image_processor):
    """transformers' LLaVA has no feature scale: the export multiplies the
    projector's first weight by it, and answers as the scaled native model."""
    model = build_model(qwen2_cfg(), vision_tower=clip_cfg(feature_scale=7.0))
    export_llava(model, tokenizer, image_processor, str(tmp_path / 'hf'))
    hf, processor = load_export(str(tmp_path / 'hf'))
    _, inputs = processor_inputs(processor, shape_image())
    assert_close(hf_logits(hf, inputs), our_logits(model, inputs))
    # The scale matters: the same model read without it answers otherwise.
    model.vision_tower.feature_scale = 1.0
    assert (hf_logits(hf, inputs) - our_logits(model, inputs)).abs().max() > 1e-2
    # The native directory keeps the scale (and the unscaled projector).
    model.vision_tower.feature_scale = 7.0
    save_native(model, tokenizer, image_processor, str(tmp_path / 'native'))
    rebuilt = load_native(str(tmp_path / 'native')).eval()
    assert rebuilt.vision_tower.feature_scale == 7.0
    assert torch.equal(our_logits(rebuilt, inputs), our_logits(model, inputs))


# --------------------------------------------------------------------------- #
# An <image> id outside the LLM's vocabulary
# --------------------------------------------------------------------------- #

@pytest.fixture(scope='module')
def small_vocab_tokenizer_dir(tmp_path_factory):
    """A tokenizer checkpoint without ``<image>``: ``HFTokenizer`` appends it
    after the last id, so an LLM sized to the checkpoint does not hold it."""
    roles = ('user', 'assistant', 'system')
    specials = ('<|endoftext|>', '<|im_start|>', '<|im_end|>', '<unk>')
    vocab = {}
    for token in (*specials, *string.printable, *roles):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex('user|assistant|system|[\\s\\S]'),
                                             behavior='isolated')
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    base = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<|endoftext|>',
                                   eos_token='<|im_end|>', unk_token='<unk>',
                                   chat_template=CHAT_TEMPLATE)
    out = str(tmp_path_factory.mktemp('tok') / 'small_vocab')
    base.save_pretrained(out)
    return out, len(base)


def _small_vocab_model(tokenizer_dir, vocab_size):
    tokenizer_cfg = dict(type='HFTokenizer', pretrained=tokenizer_dir)
    model = build_model(qwen2_cfg(vocab_size=vocab_size), tokenizer=tokenizer_cfg)
    return model, PROCESSORS.build(tokenizer_cfg)


def test_export_image_token_outside_llm_vocab(tmp_path, small_vocab_tokenizer_dir,
                                              image_processor):
    tokenizer_dir, vocab = small_vocab_tokenizer_dir
    model, tokenizer = _small_vocab_model(tokenizer_dir, vocab)
    assert model.image_token_id == vocab == len(tokenizer) - 1
    assert model.llm.get_input_embeddings().num_embeddings == vocab
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}

    export_llava(model, tokenizer, image_processor, str(tmp_path / 'hf'))
    # Exporting does not touch the live model (the LLaVA copy is resized).
    after = model.llm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    hf, processor = load_export(str(tmp_path / 'hf'))
    assert hf.config.image_token_id == vocab
    assert hf.config.text_config.vocab_size == len(tokenizer) == vocab + 1
    text, inputs = processor_inputs(processor, shape_image())
    assert text == EXPECTED_PROMPT
    assert int((inputs['input_ids'] == vocab).sum()) == NUM_PATCHES
    expected = our_logits(model, inputs)
    actual = hf_logits(hf, inputs)
    assert actual.shape[-1] == vocab + 1 and expected.shape[-1] == vocab
    assert_close(actual[..., :vocab], expected)
    assert torch.equal(hf.lm_head.weight[:vocab], model.llm.lm_head.weight)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert int(out[0, -1]) == int(expected[0, -1].argmax())


def test_export_with_resized_vocab_is_reproducible(tmp_path, small_vocab_tokenizer_dir,
                                                   image_processor):
    tokenizer_dir, vocab = small_vocab_tokenizer_dir
    model, tokenizer = _small_vocab_model(tokenizer_dir, vocab)
    export_llava(model, tokenizer, image_processor, str(tmp_path / 'a'))
    export_llava(model, tokenizer, image_processor, str(tmp_path / 'b'))
    a = load_file(str(tmp_path / 'a' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'b' / 'model.safetensors'))
    assert a.keys() == b.keys()
    different = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert not different, different


# --------------------------------------------------------------------------- #
# Models the LLaVA format cannot hold
# --------------------------------------------------------------------------- #

def test_export_linear_projector_is_unsupported(tmp_path, tokenizer, image_processor):
    model = build_model(qwen2_cfg(), projector='linear')
    out_dir = tmp_path / 'hf'
    with pytest.raises(ExportUnsupported, match='mlp2x_gelu') as info:
        export_llava(model, tokenizer, image_processor, str(out_dir))
    assert 'LinearProjector' in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not out_dir.exists()  # nothing half-written


def test_export_remote_code_llm_is_unsupported(tmp_path, tokenizer, image_processor):
    model = build_model(qwen2_cfg())

    class RemoteCausalLM(type(model.llm)):  # defined outside transformers
        pass

    model.llm.__class__ = RemoteCausalLM
    out_dir = tmp_path / 'hf'
    with pytest.raises(ExportUnsupported,
                       match=r'RemoteCausalLM is not a transformers-native LLM \(checkpoint code'):
        export_llava(model, tokenizer, image_processor, str(out_dir))
    assert not out_dir.exists()


# --------------------------------------------------------------------------- #
# Native format
# --------------------------------------------------------------------------- #

def _native_inputs(model):
    ids = torch.tensor([[1, 27] + [model.image_token_id] * NUM_PATCHES + [40, 41, 42, 2]])
    pixels = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(5))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


@pytest.mark.parametrize('projector', ['mlp2x_gelu', 'linear'])
def test_native_round_trip_after_move(tmp_path, tokenizer, image_processor, projector):
    model = build_model(qwen2_cfg(), projector=projector)
    saved = str(tmp_path / 'native')
    config = save_native(model, tokenizer, image_processor, saved)
    with open(os.path.join(saved, NATIVE_CONFIG)) as f:
        assert json.load(f) == config
    assert config['projector'] == dict(type=projector)
    assert not any(os.path.isabs(str(config[part]['pretrained']))
                   for part in ('llm', 'tokenizer', 'vision_tower'))

    moved = str(tmp_path / 'elsewhere' / 'final')
    os.makedirs(os.path.dirname(moved))
    shutil.move(saved, moved)
    assert not os.path.exists(saved)
    rebuilt = load_native(moved).eval()

    assert isinstance(rebuilt, LlavaDPAModel)
    assert type(rebuilt.projector) is type(model.projector)
    assert rebuilt.image_token_id == model.image_token_id
    assert rebuilt.vision_tower.feature_layer == model.vision_tower.feature_layer
    assert rebuilt.vision_tower.feature_select == model.vision_tower.feature_select
    for name, value in model.projector.state_dict().items():
        assert torch.equal(rebuilt.projector.state_dict()[name], value)
    inputs = _native_inputs(model)
    assert torch.equal(our_logits(rebuilt, inputs), our_logits(model, inputs))
    # The image processor travels with it.
    reloaded = PROCESSORS.build(dict(type='HFImageProcessor',
                                     pretrained=os.path.join(moved, 'vision_tower')))
    assert torch.equal(reloaded(shape_image(), return_tensors='pt')['pixel_values'],
                       image_processor(shape_image(), return_tensors='pt')['pixel_values'])


def test_native_round_trip_keeps_bfloat16_llm(tmp_path, tokenizer, image_processor):
    model = build_model({**qwen2_cfg(), 'torch_dtype': 'bfloat16'})
    assert model.llm.dtype == torch.bfloat16
    save_native(model, tokenizer, image_processor, str(tmp_path / 'native'))
    rebuilt = load_native(str(tmp_path / 'native')).eval()
    assert rebuilt.llm.dtype == torch.bfloat16
    inputs = _native_inputs(model)
    assert torch.equal(our_logits(rebuilt, inputs), our_logits(model, inputs))


def test_bfloat16_vision_tower_runs_outside_autocast():
    model = build_model({**qwen2_cfg(), 'torch_dtype': 'bfloat16'},
                        vision_tower=clip_cfg(torch_dtype='bfloat16'))
    logits = our_logits(model, _native_inputs(model))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- #
# Fed like training, stops like a chat model, loads under transformers 4.x
# --------------------------------------------------------------------------- #

NON_SQUARE_SIZES = [(150, 60), (60, 150), (33, 32), (32, 32), (7, 90)]


@pytest.fixture(scope='module')
def padded_export(tmp_path_factory, tokenizer, image_processor):
    """The tiny model saved both ways as a pad_to_square run saves it."""
    model = build_model(qwen2_cfg())
    root = tmp_path_factory.mktemp('padded')
    save_native(model, tokenizer, image_processor, str(root / 'native'), pad_to_square=True)
    export_llava(model, tokenizer, image_processor, str(root / 'hf'), pad_to_square=True)
    hf, processor = load_export(str(root / 'hf'))
    return dict(model=model, root=root, hf=hf, processor=processor)


def _training_pixels(tmp_path, sizes):
    """pixel_values as the align stage's dataset makes them (pad_to_square)."""
    folder = tmp_path / 'images'
    folder.mkdir()
    rows = []
    for i, size in enumerate(sizes):
        shape_image(size=size).save(folder / f'{i}.png')
        rows.append(dict(id=str(i), image=f'{i}.png', conversations=[
            dict(**{'from': 'human'}, value=IMAGE_TOKEN + '\nDescribe.'),
            dict(**{'from': 'gpt'}, value='a red circle')]))
    data = tmp_path / 'rows.json'
    data.write_text(json.dumps(rows))
    dataset = LLaVADataset(data_files=str(data), tokenizer=TINY_TOKENIZER, template='plain',
                           image_folder=str(folder), image_processor=CLIP.image_processor.to_dict(),
                           num_image_tokens=NUM_PATCHES, pad_to_square=True)
    return [dataset.prepare_data(i)['pixel_values'] for i in range(len(sizes))]


def test_exported_processors_reproduce_training_pixels(padded_export, tmp_path):
    expected = _training_pixels(tmp_path, NON_SQUARE_SIZES)
    native = native_image_processor(str(padded_export['root'] / 'native'))
    for size, pixels in zip(NON_SQUARE_SIZES, expected):
        image = shape_image(size=size)
        _, inputs = processor_inputs(padded_export['processor'], image)
        assert torch.equal(inputs['pixel_values'][0], pixels), size
        assert torch.equal(native(image, return_tensors='pt')['pixel_values'][0], pixels), size
    # Centre-cropping (the vision tower's own processor) would feed other pixels.
    cropped = PROCESSORS.build(CLIP.image_processor.to_dict())(
        shape_image(size=(150, 60)), return_tensors='pt')['pixel_values'][0]
    assert (cropped - expected[0]).abs().max() > 0.1


def test_exported_logits_equal_native_logits_on_non_square_images(padded_export, tmp_path):
    native = load_native(str(padded_export['root'] / 'native')).eval()
    pixels = _training_pixels(tmp_path, NON_SQUARE_SIZES[:2])
    for size, training_pixels in zip(NON_SQUARE_SIZES[:2], pixels):
        _, inputs = processor_inputs(padded_export['processor'], shape_image(size=size))
        ours = our_logits(native, dict(inputs, pixel_values=training_pixels[None]))
        assert_close(hf_logits(padded_export['hf'], inputs), ours)


def test_config_records_the_real_number_of_image_tokens(padded_export, tmp_path, tokenizer,
                                                        image_processor):
    assert padded_export['hf'].config.image_seq_length == NUM_PATCHES
    model = build_model(qwen2_cfg(), vision_tower=clip_cfg(feature_select='full'))
    export_llava(model, tokenizer, image_processor, str(tmp_path / 'full'))
    with open(tmp_path / 'full' / 'config.json') as f:
        assert json.load(f)['image_seq_length'] == NUM_PATCHES + 1


def test_generation_config_stops_at_the_end_of_turn(tmp_path, tokenizer, image_processor):
    end_of_turn = tokenizer.convert_tokens_to_ids('<|im_end|>')
    model = build_model(qwen2_cfg())
    _, inputs = processor_inputs(load_export_processor(model, tokenizer, image_processor,
                                                       tmp_path / 'probe'), shape_image())
    first = int(our_logits(model, inputs)[0, -1].argmax())
    assert first != end_of_turn
    with torch.no_grad():  # make <|im_end|> the second greedy token
        head = model.llm.lm_head.weight
        head[end_of_turn] = head[first] * 3
    export_llava(model, tokenizer, image_processor, str(tmp_path / 'hf'))
    with open(tmp_path / 'hf' / 'generation_config.json') as f:
        generation = json.load(f)
    assert end_of_turn in generation['eos_token_id']
    assert generation['pad_token_id'] == tokenizer.pad_token_id
    hf, processor = load_export(str(tmp_path / 'hf'))
    assert processor.tokenizer.padding_side == 'left'
    assert hf.config.text_config.eos_token_id == generation['eos_token_id']
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=10, do_sample=False)
    new = out[0, inputs['input_ids'].shape[1]:].tolist()
    assert new[-1] == end_of_turn and len(new) < 10, new


def load_export_processor(model, tokenizer, image_processor, out_dir):
    export_llava(model, tokenizer, image_processor, str(out_dir))
    return transformers.AutoProcessor.from_pretrained(str(out_dir))


def test_generation_config_merges_the_checkpoints_own(tokenizer):
    llm = build_model(llama_cfg()).llm
    llm.generation_config = transformers.GenerationConfig(
        eos_token_id=[7, 8], temperature=0.6, top_p=0.9, do_sample=True)
    config = generation_config(llm, tokenizer)
    im_end = tokenizer.convert_tokens_to_ids('<|im_end|>')
    assert config.eos_token_id == [im_end, 7, 8]
    assert (config.temperature, config.top_p, config.do_sample) == (0.6, 0.9, True)
    assert config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize('family,end_token', [('qwen2_5', '<|im_end|>'),
                                              ('llama3_1', '<|eot_id|>'),
                                              ('gemma2', '<end_of_turn>'),
                                              ('internlm2', '<|im_end|>')])
def test_end_of_turn_token_of_each_family(family, end_token):
    tokenizer = PROCESSORS.build(dict(type='TinyTokenizer', family=family))
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(end_token)]


def test_export_writes_the_fields_transformers4_reads(padded_export):
    root = padded_export['root'] / 'hf'
    keys = set(load_file(str(root / 'model.safetensors')))
    # 4.x's CLIPVisionModel keeps its modules under vision_model (5.x strips it on load).
    assert 'vision_tower.vision_model.embeddings.patch_embedding.weight' in keys
    assert not any(k.startswith('vision_tower.embeddings') for k in keys)
    assert {k.split('.')[0] for k in keys} == {
        'language_model', 'vision_tower', 'multi_modal_projector'}
    with open(root / 'config.json') as f:
        text = json.load(f)['text_config']
    assert text['rope_theta'] == text['rope_parameters']['rope_theta']
    with open(root / 'tokenizer_config.json') as f:
        tok = json.load(f)
    assert tok['tokenizer_class'] == 'PreTrainedTokenizerFast'
    assert tok['additional_special_tokens'] == ['<|im_start|>', IMAGE_TOKEN]
    assert not isinstance(tok.get('extra_special_tokens', {}), list)
    assert tok['model_input_names'] == ['input_ids', 'attention_mask']
    assert tok['padding_side'] == 'left'
    with open(root / 'preprocessor_config.json') as f:
        images = json.load(f)
    assert images['image_processor_type'] == 'LlavaImageProcessor' and images['do_pad']


def test_export_rope_scaling_is_written_for_transformers4(tmp_path, tokenizer, image_processor):
    scaling = dict(rope_type='linear', factor=2.0)
    model = build_model(qwen2_cfg(rope_theta=1e6, rope_scaling=dict(scaling)))
    export_llava(model, tokenizer, image_processor, str(tmp_path / 'hf'))
    with open(tmp_path / 'hf' / 'config.json') as f:
        text = json.load(f)['text_config']
    assert text['rope_theta'] == 1e6
    assert text['rope_scaling'] == scaling


def test_export_fails_loudly_when_weights_would_not_reload(
        tmp_path, tokenizer, image_processor, monkeypatch):
    from dpa.models import hf_compat
    monkeypatch.setitem(hf_compat.LEGACY_VISION_PREFIX, 'CLIPVisionModel', 'vision_encoder.')
    model = build_model(qwen2_cfg())
    with pytest.raises(ExportMismatch, match='vision_tower.embeddings.patch_embedding.weight'):
        export_llava(model, tokenizer, image_processor, str(tmp_path / 'hf'))


FAMILY_BASES = ['tiny_qwen2.py', 'qwen2_5_7b_instruct.py', 'llama3_1_8b_instruct.py',
                'gemma2_9b_it.py', 'internlm2_chat_7b.py']
ROUND_TRIP_TEXTS = ['a red circle on the left.', 'What colour is the shape?',
                    IMAGE_TOKEN + '\nDescribe the image briefly.', 'Zebra 42 %$ ünïcode']


@pytest.mark.parametrize('base', FAMILY_BASES)
def test_native_tokenizer_round_trips_for_every_family(base):
    cfg = Config.fromfile(os.path.join(ROOT, 'configs/_base_/models', base))
    if 'llm_standin' in cfg:
        llm = dict(config={**TINY_LLM, **cfg.llm_standin.config},
                   trust_remote_code=cfg.llm.get('trust_remote_code', False))
        tokenizer_cfg = cfg.llm_standin.tokenizer
    else:
        llm, tokenizer_cfg = cfg.llm, cfg.tokenizer
    llm_config = hf_config(config=llm['config'],
                           trust_remote_code=llm.get('trust_remote_code', False))
    tokenizer = PROCESSORS.build(tokenizer_cfg)
    chat = tokenizer.apply_chat_template([{'role': 'user', 'content': ROUND_TRIP_TEXTS[2]}],
                                         tokenize=False, add_generation_prompt=True)
    assert tokenizer_round_trip_problems(tokenizer, ROUND_TRIP_TEXTS + [chat], llm_config) == []


def test_round_trip_check_catches_a_tokenizer_that_reloads_as_another_class(tokenizer):
    """AutoTokenizer picks Qwen2Tokenizer for a tokenizer saved beside a qwen2
    config and re-splits a custom vocabulary: the check must say so."""
    llm_config = hf_config(config=QWEN2.llm.config.to_dict())
    problems = tokenizer_round_trip_problems(tokenizer, ROUND_TRIP_TEXTS, llm_config,
                                             reload=transformers.AutoTokenizer.from_pretrained)
    assert problems and 'Qwen2Tokenizer' in problems[0]


def test_check_data_reports_a_tokenizer_that_does_not_round_trip(tmp_path, monkeypatch):
    from dpa.datasets.validation import tokenizer_round_trip
    from dpa.registry import DATASETS
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', 'dpa_tiny.py'))
    # The first row is not an object: skipped here, not a crash.
    (tmp_path / 'rows.jsonl').write_text('[1, 2]\n' + json.dumps(dict(id='0', conversations=[
        {'from': 'human', 'value': 'Describe the image briefly.'},
        {'from': 'gpt', 'value': 'a small red circle on the left.'}])) + '\n')
    dataset = DATASETS.build(dict(type='LLaVADataset', template='caption_text',
                                  tokenizer=TINY_TOKENIZER,
                                  data_files=[str(tmp_path / 'rows.jsonl')]))
    assert tokenizer_round_trip(cfg.llm, cfg.tokenizer, [dataset]) == []
    monkeypatch.setattr('dpa.models.builders.HFTokenizer',
                        transformers.AutoTokenizer.from_pretrained)
    problems = tokenizer_round_trip(cfg.llm, cfg.tokenizer, [dataset])
    assert problems and {p['reason'] for p in problems} == {'tokenizer_round_trip'}
    assert 'Qwen2Tokenizer' in problems[0]['detail']


def test_siglip_processor_pads_like_training():
    """SigLIP resizes to a fixed size and has no centre crop: the exported
    processor must not add LLaVA's default 224-pixel crop."""
    siglip = transformers.SiglipImageProcessor(size=dict(height=32, width=32))
    exported = training_image_processor(siglip, pad_to_square=True)
    for size in NON_SQUARE_SIZES:
        image = shape_image(size=size)
        assert torch.equal(exported(images=image, return_tensors='pt').pixel_values[0],
                           preprocess_image(image, siglip, pad_to_square=True)), size
