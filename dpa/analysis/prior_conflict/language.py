"""The two styles of the benchmark, its word-level tokenizer and the style-A
pre-training corpus of the prior LLM; and the natural English wording of the
questions and answers that a real pretrained LLM is asked in."""
import random
from typing import Dict, List, Tuple

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'pink')
SHAPES = ('circle', 'square', 'triangle', 'diamond')
POSITIONS = ('left', 'right', 'top', 'bottom', 'center')
ATTRIBUTES = {'colour': COLOURS, 'shape': SHAPES, 'position': POSITIONS}
WHERE = {'left': 'on the left', 'right': 'on the right', 'top': 'at the top',
         'bottom': 'at the bottom', 'center': 'in the center'}
QUESTIONS = {'colour': 'what colour is the shape ?', 'shape': 'what shape is it ?',
             'position': 'where is the shape ?'}
STYLE_A_SENTENCES = ('the picture shows a {colour} {shape} {where} .',
                     'there is a {colour} {shape} {where} .',
                     'the image shows a {colour} {shape} {where} .')
STYLE_B_CAPTION = '[ {position} ] {shape} / {colour} .'
STYLE_B_TOKENS = ('[', ']', '/')
FILLERS = ('some', 'see', 'here', 'look', 'nice', 'small')
SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>', '<image>', '<unk>')
ROLES = ('system', 'user', 'assistant')
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
Scene = Dict[str, str]
# The same questions and answers in English, for a real LLM's prior (the
# captions keep style B: the conflict is the point).
NATURAL_QUESTIONS = {'colour': 'What colour is the shape?', 'shape': 'What shape is it?',
                     'position': 'Where is the shape?'}
NATURAL_ANSWERS = {'colour': 'The shape is {colour}.', 'shape': 'It is a {shape}.',
                   'position': 'The shape is {where}.'}
NATURAL_STYLE_A = 'The picture shows a {colour} {shape} {where}.'


def natural_answer(attribute: str, scene: Scene) -> str:
    """The English answer about ``attribute`` of ``scene``."""
    return NATURAL_ANSWERS[attribute].format(where=WHERE[scene['position']], **scene)


def natural_sentence(scene: Scene) -> str:
    """The scene as an English sentence (style A of a real LLM's prior)."""
    return NATURAL_STYLE_A.format(where=WHERE[scene['position']], **scene)


def words() -> List[str]:
    """Every word of both styles (the tokenizer's vocabulary, specials aside)."""
    vocab = []
    texts = list(STYLE_A_SENTENCES) + list(QUESTIONS.values()) + [STYLE_B_CAPTION]
    texts += [' '.join(v) for v in ATTRIBUTES.values()] + list(WHERE.values())
    texts += [' '.join(FILLERS), ' '.join(ROLES)]
    for text in texts:
        for word in text.replace('{', ' {').split():
            if not word.startswith('{') and word not in vocab:
                vocab.append(word)
    return vocab


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, whitespace-separated; chat template as ChatML."""
    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(words()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix='##')  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token='<unk>', pad_token='<|endoftext|>',
        eos_token='<|im_end|>', extra_special_tokens=['<|im_start|>', '<image>'],
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=512)


def random_scene(rng: random.Random) -> Scene:
    return {name: rng.choice(values) for name, values in ATTRIBUTES.items()}


def style_a_sentence(rng: random.Random, scene: Scene) -> str:
    return rng.choice(STYLE_A_SENTENCES).format(where=WHERE[scene['position']], **scene)


def style_a_bag(rng: random.Random, scene: Scene) -> str:
    """The scene's three content words among 0-2 fillers, in random order."""
    bag = [scene['colour'], scene['shape'], scene['position']]
    bag += rng.sample(FILLERS, rng.randint(0, 2))
    rng.shuffle(bag)
    return ' '.join(bag)


def style_b_caption(scene: Scene) -> str:
    return STYLE_B_CAPTION.format(**scene)


def qa_turns(rng: random.Random, scene: Scene, count: int) -> List[Tuple[str, str, str]]:
    """``count`` different (attribute, question, answer) triples about the scene."""
    picked = rng.sample(list(ATTRIBUTES), count)
    return [(name, QUESTIONS[name], f'{scene[name]} .') for name in picked]


def chat(context: str, turns) -> List[dict]:
    """A conversation: the context (if any) before the first question."""
    messages = []
    for i, (_, question, answer) in enumerate(turns):
        user = f'{context} {question}' if i == 0 and context else question
        messages += [dict(role='user', content=user), dict(role='assistant', content=answer)]
    return messages


def corpus_document(rng: random.Random, tokenizer) -> str:
    """One style-A pre-training document: 35% chats whose scene is a sentence,
    40% chats whose scene is a bag of words, 10% plain sentences, 15% chats
    without a scene (their answers are guesses: the prior)."""
    scene, draw = random_scene(rng), rng.random()
    if draw < 0.10:
        return style_a_sentence(rng, scene) + ' <|endoftext|>'
    if draw < 0.45:
        context = style_a_sentence(rng, scene)
    elif draw < 0.85:
        context = style_a_bag(rng, scene)
    else:
        context = ''
    messages = chat(context, qa_turns(rng, scene, rng.randint(1, 3)))
    return tokenizer.apply_chat_template(messages, tokenize=False)
