"""Deterministic synthetic LLaVA-format data for the tiny embedded default.

Pictures of one or two coloured shapes on a plain background, with truthful
captions (pretraining format), question/answer conversations (instruction
format) and a held-out evaluation split of multiple-choice questions about
colour, shape and position (rows ``{"id", "image", "question", "answer",
"options", "type"}``, read by :mod:`dpa.evaluation`). All text comes from the
templates of :mod:`dpa.synthetic_text`, whose ``VOCABULARY`` lists every word a
word-level tokenizer needs.
"""
import hashlib
import json
import os
import random
import shutil

from PIL import Image, ImageDraw

from dpa.synthetic_text import (BACKGROUNDS, CAPTIONS_ONE, CAPTIONS_TWO, CAPTION_PROMPT, COLOURS,
                                EVAL_QUESTIONS, IMAGE_TOKEN, POSITIONS, QA_ABSENT, QA_EACH,
                                QA_ONE, QA_PRESENT, QA_SCENE, QA_TEXT, QA_TWO, SHAPES, SIZES,
                                capitalize)

# Bump when the generator changes so cached roots are regenerated.
_FORMAT_VERSION = 2

# Two shapes sit at opposite sides so they never overlap.
_PAIRS = (('left', 'right'), ('top', 'bottom'))
_CORNERS = {'circle': 0, 'square': 4, 'triangle': 3, 'diamond': 4}
_MIXES = (('blue', 'yellow', 'green'), ('red', 'blue', 'purple'), ('red', 'white', 'pink'))

EVAL_OPTIONS = 4


def _sample_scene(rng):
    count = rng.choice((1, 2))
    positions = [rng.choice(list(POSITIONS))] if count == 1 else rng.choice(_PAIRS)
    shapes = [
        dict(shape=shape, colour=colour, size=rng.choice(list(SIZES)), where=POSITIONS[pos][0],
             position=pos)
        for shape, colour, pos in zip(rng.sample(SHAPES, count), rng.sample(list(COLOURS), count),
                                      positions)
    ]
    return dict(shapes=shapes, bg=rng.choice(list(BACKGROUNDS)))


def draw_scene(scene, size):
    """The picture of a scene: ``bg`` and ``shapes``, each with ``shape``,
    ``colour``, ``size``, ``position`` and optionally ``offset``, a (dx, dy)
    shift from the position's centre as a fraction of the side."""
    image = Image.new('RGB', (size, size), BACKGROUNDS[scene['bg']])
    draw = ImageDraw.Draw(image)
    for s in scene['shapes']:
        fx, fy = POSITIONS[s['position']][1]
        dx, dy = s.get('offset', (0.0, 0.0))
        x, y, r = (fx + dx) * size, (fy + dy) * size, SIZES[s['size']] * size
        fill = COLOURS[s['colour']]
        if s['shape'] == 'circle':
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif s['shape'] == 'square':
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        elif s['shape'] == 'triangle':
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        else:  # diamond
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return image


def _fields(scene):
    """Template fields describing the whole scene."""
    shapes = scene['shapes']
    if len(shapes) == 1:
        return dict(shapes[0], bg=scene['bg'])
    fields = dict(bg=scene['bg'])
    for prefix, shape in zip('ab', shapes):
        fields.update({f'{prefix}_{k}': v for k, v in shape.items()})
    return fields


def _caption(rng, scene):
    templates = CAPTIONS_ONE if len(scene['shapes']) == 1 else CAPTIONS_TWO
    return rng.choice(templates).format(**_fields(scene))


def _terse_caption(rng, scene):
    """The scene in a style the instruction answers never use ("top: circle,
    red."): the same content words, another order and punctuation."""
    _caption(rng, scene)  # the same draws as 'plain': the other rows stay the same
    return ' '.join(f"{shape['position']}: {shape['shape']}, {shape['colour']}."
                    for shape in scene['shapes'])


def _bracket_caption(rng, scene):
    """The scene as "[ top ] circle / red .": a style a pretrained LLM's prior
    finds very unlikely (SmolLM2-135M-Instruct: 8.6 nats a token, against 4.1
    for "A red circle at the top.")."""
    _caption(rng, scene)  # the same draws as 'plain': the other rows stay the same
    return ' '.join(f"[ {shape['position']} ] {shape['shape']} / {shape['colour']} ."
                    for shape in scene['shapes'])


# How stage 1 and 2's captions are worded (make_synthetic_data's caption_style).
CAPTION_STYLES = {'plain': _caption, 'terse': _terse_caption, 'bracket': _bracket_caption}


def _image_qa(rng, scene):
    """All (question, answer) pairs answerable from the scene."""
    fields = _fields(scene)
    fields['caption'] = capitalize(_caption(rng, scene))
    shapes = scene['shapes']
    templates = (QA_ONE if len(shapes) == 1 else QA_TWO) + QA_SCENE
    qa = [(q.format(**fields), a.format(**fields)) for q, a in templates]
    if len(shapes) == 2:
        qa += [(q.format(**s), a.format(**s)) for s in shapes for q, a in QA_EACH]
    present = rng.choice(shapes)
    qa.append((QA_PRESENT[0].format(**present), QA_PRESENT[1].format(**present)))
    shown = {s['shape'] for s in shapes}
    absent = rng.choice([shape for shape in SHAPES if shape not in shown])
    qa.append((QA_ABSENT[0].format(shape=absent), QA_ABSENT[1].format(shape=absent)))
    return qa


def _question_template(scene, kind):
    """The (question, answer) template of the evaluation type ``kind`` for
    ``scene``, or None where the scene cannot ask it (the shape of two shapes)."""
    one_template, each_template, _ = EVAL_QUESTIONS[kind]
    return one_template if len(scene['shapes']) == 1 else each_template


def _asked_qa(rng, scene, kind):
    """The evaluation question of type ``kind`` about ``scene`` as a training
    turn, or None where the scene cannot ask it."""
    template = _question_template(scene, kind)
    if template is None:
        return None
    shapes = scene['shapes']
    subject = _fields(scene) if len(shapes) == 1 else rng.choice(shapes)
    return template[0].format(**subject), template[1].format(**subject)


def _image_conversation(rng, ask_rng, scene, turns, always_ask):
    """``turns`` question/answer pairs about ``scene``, drawn from every pair
    it can answer; with ``always_ask``, those of its types that the scene can
    answer replace drawn ones. They are picked with ``ask_rng``, so that
    ``rng`` draws what it draws without them: the same pictures, and the same
    held-out split."""
    drawn = rng.sample(_image_qa(rng, scene), turns)
    if not always_ask:
        return _conversation(drawn)
    asked = [qa for qa in (_asked_qa(ask_rng, scene, kind) for kind in always_ask) if qa]
    kept = [qa for qa in drawn if qa not in asked][:max(0, turns - len(asked))]
    pairs = asked + kept
    ask_rng.shuffle(pairs)
    return _conversation(pairs)


def _text_qa(rng, i):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    x, y, z = rng.choice(_MIXES)
    shape = rng.choice(SHAPES)
    word = rng.choice(SHAPES + tuple(COLOURS))
    fields = (
        dict(a=a, b=b, c=a + b),
        dict(a=max(a, b), b=min(a, b), c=abs(a - b)),
        dict(x=x, y=y, z=z),
        dict(shape=shape, n=_CORNERS[shape]),
        dict(word=word, kind='shape' if word in SHAPES else 'colour'),
    )
    q, ans = QA_TEXT[i]
    return q.format(**fields[i]), ans.format(**fields[i])


def _conversation(qa_pairs):
    turns = []
    for question, answer in qa_pairs:
        turns += [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]
    return turns


def _scene_key(scene):
    return json.dumps(scene, sort_keys=True)


def _eval_row(rng, scene, kind):
    """One multiple-choice question about ``scene``, or None if the scene
    cannot ask it (e.g. "What shape is it?" of two shapes)."""
    template = _question_template(scene, kind)
    if template is None:
        return None
    question, answer = template
    field = EVAL_QUESTIONS[kind][2]
    subject = rng.choice(scene['shapes'])
    pool = {'colour': list(COLOURS), 'shape': list(SHAPES),
            'where': [phrase for phrase, _ in POSITIONS.values()]}[field]
    wrong = rng.sample([v for v in pool if v != subject[field]], EVAL_OPTIONS - 1)
    values = [subject[field]] + wrong
    rng.shuffle(values)
    options = [answer.format(**dict(subject, **{field: v})) for v in values]
    return dict(question=question.format(**subject), answer=answer.format(**subject),
                options=options, type=kind)


def _generate_eval(rng, out_dir, num_eval, image_size, train_scenes):
    """Held-out rows: their pictures are new files of scenes no training image shows."""
    kinds = list(EVAL_QUESTIONS)
    with open(os.path.join(out_dir, 'eval.jsonl'), 'w') as f:
        for i in range(num_eval):
            while True:
                scene = _sample_scene(rng)
                row = None if _scene_key(scene) in train_scenes else _eval_row(
                    rng, scene, kinds[i % len(kinds)])
                if row is not None:
                    break
            name = f'eval_{i:06d}'
            draw_scene(scene, image_size).save(os.path.join(out_dir, 'images', name + '.png'))
            f.write(json.dumps(dict(id=name, image=name + '.png', **row)) + '\n')


def _generate(out_dir, num_captions, num_instructions, num_eval, image_size, seed,
              caption_style='plain', always_ask=()):
    rng = random.Random(seed)
    caption = CAPTION_STYLES[caption_style]
    image_dir = os.path.join(out_dir, 'images')
    os.makedirs(image_dir)

    captions, train_scenes = [], set()
    for i in range(num_captions):
        scene = _sample_scene(rng)
        train_scenes.add(_scene_key(scene))
        name = f'cap_{i:06d}'
        draw_scene(scene, image_size).save(os.path.join(image_dir, name + '.png'))
        conversation = _conversation([(CAPTION_PROMPT, caption(rng, scene))])
        captions.append(dict(id=name, image=name + '.png', conversations=conversation))
    with open(os.path.join(out_dir, 'captions.json'), 'w') as f:
        json.dump(captions, f, indent=1)

    text_only = set(rng.sample(range(num_instructions), round(0.3 * num_instructions)))
    ask_rng = random.Random(f'always_ask {seed}')
    with open(os.path.join(out_dir, 'instructions.jsonl'), 'w') as f:
        for i in range(num_instructions):
            name = f'ins_{i:06d}'
            turns = rng.randint(1, 3)
            if i in text_only:
                picked = rng.sample(range(len(QA_TEXT)), turns)
                row = dict(id=name, conversations=_conversation(_text_qa(rng, k) for k in picked))
            else:
                scene = _sample_scene(rng)
                train_scenes.add(_scene_key(scene))
                draw_scene(scene, image_size).save(os.path.join(image_dir, name + '.png'))
                conversation = _image_conversation(rng, ask_rng, scene, turns, always_ask)
                conversation[0]['value'] = IMAGE_TOKEN + '\n' + conversation[0]['value']
                row = dict(id=name, image=name + '.png', conversations=conversation)
            f.write(json.dumps(row) + '\n')
    # Drawn after the training rows, from the same generator: those stay as they were.
    _generate_eval(rng, out_dir, num_eval, image_size, train_scenes)


# What a synthetic data folder records: its settings and every file it wrote.
MANIFEST = 'synthetic_data.json'
# The record of folders made before the manifest (their settings only).
_LEGACY_RECORD = '.complete'


def _settings(num_captions, num_instructions, num_eval, image_size, seed, caption_style,
              always_ask=()):
    settings = dict(version=_FORMAT_VERSION, num_captions=num_captions,
                    num_instructions=num_instructions, num_eval=num_eval,
                    image_size=image_size, seed=seed)
    # Recorded only when set, so that folders made before the options stay valid.
    if caption_style != 'plain':
        settings['caption_style'] = caption_style
    if always_ask:
        settings['always_ask'] = list(always_ask)
    return settings


def _folder_name(settings) -> str:
    """The folder of a data set inside ``root``, named by its settings."""
    return (f"c{settings['num_captions']}_i{settings['num_instructions']}_"
            f"e{settings['num_eval']}_{settings['image_size']}px_seed{settings['seed']}_"
            f"{settings.get('caption_style', 'plain')}"
            f"{''.join('_ask-' + kind for kind in settings.get('always_ask', ()))}"
            f"_v{settings['version']}")


def _recorded_settings(folder):
    """The settings of the data set ``folder`` holds (None: it holds none)."""
    for name, key in ((MANIFEST, 'settings'), (_LEGACY_RECORD, None)):
        try:
            with open(os.path.join(folder, name)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        return record.get(key) if key and isinstance(record, dict) else record
    return None


def _paths(folder):
    return dict(
        image_folder=os.path.join(folder, 'images'),
        captions=os.path.join(folder, 'captions.json'),
        instructions=os.path.join(folder, 'instructions.jsonl'),
        eval=os.path.join(folder, 'eval.jsonl'),
    )


def _is_free(folder) -> bool:
    return not os.path.exists(folder) or (os.path.isdir(folder) and not os.listdir(folder))


def _folder_for(root, settings):
    """Where the data set of ``settings`` is, or goes: ``root`` itself when
    it holds that set or nothing at all (so the first set made there is where
    the README says), else ``root/<settings>``."""
    if _recorded_settings(root) == settings or _is_free(root):
        return root
    return os.path.join(root, _folder_name(settings))


def synthetic_data_paths(root, num_captions=64, num_instructions=48, image_size=64, seed=0,
                         num_eval=48, caption_style='plain', always_ask=()):
    """The paths :func:`make_synthetic_data` returns, when the data set of
    these settings exists already; None otherwise. Nothing is written."""
    settings = _settings(num_captions, num_instructions, num_eval, image_size, seed,
                         caption_style, check_always_ask(always_ask))
    root = os.path.abspath(os.fspath(root))
    for folder in (root, os.path.join(root, _folder_name(settings))):
        if _recorded_settings(folder) == settings:
            return _paths(folder)
    return None


def _write_manifest(folder, settings):
    """List every file the generator wrote, with its sha256, beside them."""
    files = {}
    for base, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(base, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(folder, MANIFEST), 'w') as f:
        json.dump(dict(settings=settings, files=dict(sorted(files.items()))), f, indent=1)


def check_always_ask(always_ask) -> tuple:
    """``always_ask`` as a tuple of evaluation question types, each once."""
    if isinstance(always_ask, str):
        always_ask = (always_ask,)
    if not isinstance(always_ask, (list, tuple, type(None))):
        raise ValueError(f'synthetic_data.always_ask={always_ask!r}: give a list of question '
                         "types, e.g. ['position']")
    always_ask = tuple(dict.fromkeys(always_ask or ()))
    unknown = [kind for kind in always_ask if kind not in EVAL_QUESTIONS]
    if unknown:
        raise ValueError(f'synthetic_data.always_ask={list(always_ask)!r}: {unknown} are not '
                         f'question types; choose from {list(EVAL_QUESTIONS)}')
    return always_ask


def make_synthetic_data(root, num_captions=64, num_instructions=48, image_size=64, seed=0,
                        num_eval=48, caption_style='plain', always_ask=()):
    """Generate (once) the synthetic data set of these settings under ``root``;
    return its paths (``image_folder``, ``captions``, ``instructions``, ``eval``).

    ``root`` holds one data set per settings and nothing is ever deleted: the
    first set made in ``root`` is written in it (``root/captions.json``,
    ``root/images/``, ...), any other in a folder of its own named by its
    settings (``root/c8_i4_e48_32px_seed0_plain_v2/``), so a file you put in
    ``root`` stays and a run reading one set never sees another replace it.
    Each set is built aside and moved into place by one rename, with
    ``synthetic_data.json`` listing its settings and every file it wrote
    (sha256). The same settings give the same bytes.

    Args:
        caption_style: the captions' wording, a key of :data:`CAPTION_STYLES`:
            ``'plain'`` as the instruction answers speak, ``'terse'``
            ("top: circle, red.") or ``'bracket'`` ("[ top ] circle / red .")
            in a conflicting style with the same content words, to give the
            captions a language prior of their own.
        always_ask: evaluation question types (``'colour'``, ``'shape'``,
            ``'position'``) that every instruction picture is asked, where
            it can answer them (the shape of two shapes it cannot), among
            its 1-3 turns; the others are drawn as before. Empty: every turn
            is drawn from all the picture's questions (about one in nine
            asks where a shape is).
    """
    if caption_style not in CAPTION_STYLES:
        raise ValueError(f'synthetic_data.caption_style={caption_style!r}: choose one of '
                         f'{sorted(CAPTION_STYLES)}')
    always_ask = check_always_ask(always_ask)
    settings = _settings(num_captions, num_instructions, num_eval, image_size, seed,
                         caption_style, always_ask)
    root = os.path.abspath(os.fspath(root))
    folder = _folder_for(root, settings)
    if _recorded_settings(folder) == settings:
        return _paths(folder)

    # Build aside and rename, so readers never see a half-written set.
    tmp = f'{folder}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _generate(tmp, num_captions, num_instructions, num_eval, image_size, seed, caption_style,
                  always_ask)
        _write_manifest(tmp, settings)
        os.replace(tmp, folder)  # fails on a folder that is not empty: never replaced
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _recorded_settings(folder) == settings:
            return _paths(folder)  # another process (e.g. another rank) made it first
        if folder == root and not _is_free(root):
            # Another process filled root with something else meanwhile.
            return make_synthetic_data(root, num_captions, num_instructions, image_size, seed,
                                       num_eval, caption_style, always_ask)
        raise
    return _paths(folder)
