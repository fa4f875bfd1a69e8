"""The words of the synthetic data: its shapes, colours, positions and
sentence templates, and ``VOCABULARY``, every token they can produce.

Below every other module, so the word-level tiny tokenizer
(:mod:`dpa.models.tiny_tokenizer`) and the data generator
(:mod:`dpa.datasets.synthetic`) both import it downward."""
import re

IMAGE_TOKEN = '<image>'
CAPTION_PROMPT = IMAGE_TOKEN + '\nDescribe the image briefly.'
# No colour, size or shape starts with a vowel, so "a {colour} {shape}" is always grammatical.
SHAPES = ('circle', 'square', 'triangle', 'diamond')
COLOURS = {
    'red': (220, 40, 40),
    'green': (40, 170, 60),
    'blue': (40, 80, 220),
    'yellow': (240, 210, 40),
    'purple': (140, 60, 180),
    'pink': (250, 120, 180),
}
# Disjoint from COLOURS so a shape never vanishes into its background.
BACKGROUNDS = {'white': (255, 255, 255), 'gray': (128, 128, 128), 'black': (0, 0, 0)}
# position -> (phrase, centre as a fraction of the image side)
POSITIONS = {
    'left': ('on the left', (0.25, 0.5)),
    'right': ('on the right', (0.75, 0.5)),
    'top': ('at the top', (0.5, 0.25)),
    'bottom': ('at the bottom', (0.5, 0.75)),
    'center': ('in the center', (0.5, 0.5)),
}
SIZES = {'small': 0.1, 'large': 0.2}  # half-width as a fraction of the image side
# Fields: shape, colour, size, where, bg.
CAPTIONS_ONE = (
    'a {colour} {shape}.',
    'a {size} {colour} {shape} {where}.',
    'a {size} {colour} {shape} {where} of a {bg} background.',
    'a simple picture of a {colour} {shape} on a {bg} background.',
    'there is a {size} {colour} {shape} {where} of the image.',
)
# Fields: a_* and b_* for the two shapes, bg.
CAPTIONS_TWO = (
    'a {a_colour} {a_shape} and a {b_colour} {b_shape}.',
    'two shapes: a {a_size} {a_colour} {a_shape} {a_where} '
    'and a {b_size} {b_colour} {b_shape} {b_where}.',
    'a {a_colour} {a_shape} {a_where} and a {b_colour} {b_shape} {b_where} on a {bg} background.',
)
QA_ONE = (
    ('How many shapes are there?', 'There is one shape.'),
    ('What colour is the shape?', 'The shape is {colour}.'),
    ('What shape is it?', 'It is a {shape}.'),
    ('Is the shape large or small?', 'The shape is {size}.'),
    ('Where is the shape?', 'The shape is {where}.'),
)
QA_TWO = (
    ('How many shapes are there?', 'There are two shapes.'),
    ('What shapes are in the image?', 'A {a_colour} {a_shape} and a {b_colour} {b_shape}.'),
)
# Asked about each shape of a two-shape picture; shapes there are distinct.
QA_EACH = (
    ('What colour is the {shape}?', 'The {shape} is {colour}.'),
    ('Where is the {shape}?', 'The {shape} is {where}.'),
    ('Is the {shape} large or small?', 'The {shape} is {size}.'),
)
QA_SCENE = (
    ('What colour is the background?', 'The background is {bg}.'),
    ('Describe the image.', '{caption}'),
)
# The evaluation questions, by type: (one-shape template, two-shape template or
# None, the field asked about). Their answers are the instruction answers, so
# the options differ from the right answer in one word only.
EVAL_QUESTIONS = {
    'colour': (QA_ONE[1], QA_EACH[0], 'colour'),
    'shape': (QA_ONE[2], None, 'shape'),
    'position': (QA_ONE[4], QA_EACH[1], 'where'),
}
QA_PRESENT = ('Is there a {shape} in the image?', 'Yes, there is a {shape} {where}.')
QA_ABSENT = ('Is there a {shape} in the image?', 'No, there is no {shape} in the image.')
QA_TEXT = (
    ('What is {a} plus {b}?', '{a} plus {b} is {c}.'),
    ('What is {a} minus {b}?', '{a} minus {b} is {c}.'),
    ('What colour do you get by mixing {x} and {y}?', 'Mixing {x} and {y} gives {z}.'),
    ('How many corners does a {shape} have?', 'A {shape} has {n} corners.'),
    ('Is {word} a shape or a colour?', 'It is a {kind}.'),
)


def capitalize(text):
    return text[:1].upper() + text[1:]


def _vocabulary():
    """Every word and punctuation token the templates can produce."""
    texts = list(CAPTIONS_ONE) + list(CAPTIONS_TWO)
    # "Describe the image." answers with the caption, capitalized.
    texts += [capitalize(t) for t in texts]
    for pairs in (QA_ONE, QA_TWO, QA_EACH, QA_SCENE, QA_TEXT, (QA_PRESENT, QA_ABSENT)):
        texts += [t for pair in pairs for t in pair]
    texts += [CAPTION_PROMPT.replace(IMAGE_TOKEN, ''), *SHAPES, *COLOURS, *BACKGROUNDS, *SIZES]
    texts += [phrase for phrase, _ in POSITIONS.values()]
    tokens = set('0123456789 \n')
    for text in texts:
        tokens.update(re.findall(r'[A-Za-z]+|[^A-Za-z0-9\s]', re.sub(r'\{\w+\}', ' ', text)))
    return tuple(sorted(tokens))


VOCABULARY = _vocabulary()
