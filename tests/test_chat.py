"""tools/chat.py on the tiny default's final model: the one-question mode,
the conversation's prompts (the first turn is exactly evaluation's prompt)
and the interactive commands."""
import glob
import os.path as osp
import runpy

import pytest

import dpa  # noqa: F401
from dpa.evaluation.chat import ChatSession, interact
from dpa.evaluation.models import load_eval_model, load_image

from tiny import REPO

QUESTION = 'What colour is the shape?'


@pytest.fixture(scope='module')
def image(data_root, finished):
    return sorted(glob.glob(osp.join(str(data_root), 'images', '*.png')))[0]


def greedy_answer(model, question, image_path, max_new_tokens):
    """Evaluation's own generation of the same turn, cut at the end of turn."""
    ids, pixels = model.prompt(question, load_image(image_path))
    (new, ) = model.generate([ids], [pixels], max_new_tokens)
    stop = set(model.end_of_turn_ids)
    end = next((i for i, token in enumerate(new) if token in stop), len(new))
    return model.tokenizer.decode(new[:end], skip_special_tokens=True).strip()


def test_prompt_mode_streams_the_greedy_answer(finished, image, capsys):
    work_dir, _ = finished
    main = runpy.run_path(osp.join(REPO, 'tools', 'chat.py'))['main']
    main([str(work_dir), '--image', image, '--prompt', QUESTION, '--max-new-tokens', '12'])
    out = capsys.readouterr().out
    expected = greedy_answer(load_eval_model(str(work_dir)), QUESTION, image, 12)
    assert expected and out.strip() == expected


@pytest.mark.parametrize('kind', ['native', 'hf_llava'])
def test_conversation_prompts_and_commands(finished, image, kind):
    work_dir, manifests = finished
    final = manifests[2]['artifact']
    model = load_eval_model(final if kind == 'native' else osp.join(final, 'hf_llava'))
    session = ChatSession(model, max_new_tokens=4)
    session.attach(image)
    ids, pixels = session.prompt(QUESTION)
    expected_ids, expected_pixels = model.prompt(QUESTION, load_image(image))
    assert ids == expected_ids and len(pixels) == 1
    assert (pixels[0] == expected_pixels).all()

    lines = iter([f'/image {image}', QUESTION, 'And where is it?', '/image missing.png',
                  '/reset', 'Hello'])

    def read_line(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    transcript = []

    class Out:
        def write(self, text):
            transcript.append(text)

        def flush(self):
            pass

    session = ChatSession(model, max_new_tokens=4)
    asked = []
    ask = session.ask
    session.ask = lambda question, out: asked.append(
        (question, len(session.messages), len(session.images))) or ask(question, out)
    interact(session, read_line, Out())
    # The second question sees the first turn and its image; /reset forgets both.
    assert asked == [(QUESTION, 0, 0), ('And where is it?', 2, 1), ('Hello', 0, 0)]
    assert session.messages[0]['content'] == 'Hello' and not session.images
    assert "cannot open 'missing.png'" in ''.join(transcript)


def test_text_only_turn_generates_alike_natively_and_with_transformers(finished):
    """A chat turn without an image: transformers 5's generate() must not get
    a pixel_values key (it would run the vision tower on None)."""
    _, manifests = finished
    final = manifests[2]['artifact']
    answers = []
    for path in (final, osp.join(final, 'hf_llava')):
        model = load_eval_model(path)
        ids, pixels = model.prompt('Hello', None)
        assert pixels is None
        answers.append(model.generate([ids], [], 6)[0])
    assert answers[0] == answers[1] and len(answers[0]) > 0
