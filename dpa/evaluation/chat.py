"""Talking to a trained model: ``tools/chat.py``.

The model is loaded by :func:`dpa.evaluation.models.load_eval_model` (a work
dir's final model, a native model dir or an ``hf_llava`` export) and fed as
evaluation feeds it: the chat template of the tokenizer, the images
preprocessed as in training, greedy decoding that stops at the end-of-turn
token (:func:`dpa.evaluation.models.end_of_turn_ids`). A conversation keeps
every turn and every image attached so far.
"""
import sys
from typing import Callable, List

from transformers import TextStreamer

from dpa.evaluation.models import image_inputs, load_image
from dpa.models.builders import IMAGE_TOKEN

COMMANDS = ('/image PATH', '/reset', '/quit')


class WriteStreamer(TextStreamer):
    """transformers' ``TextStreamer`` (new tokens only, special tokens
    dropped) writing to ``out`` instead of stdout."""

    def __init__(self, tokenizer, out=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False):
        out = self.out or sys.stdout
        out.write(text + ('\n' if stream_end else ''))
        out.flush()


class ChatSession:
    """A multi-turn conversation with a model of :func:`load_eval_model`.

    Args:
        model: a ``NativeEvalModel`` or ``HFLlavaEvalModel``.
        max_new_tokens: longest answer.
    """

    def __init__(self, model, max_new_tokens: int = 256):
        self.model, self.max_new_tokens = model, max_new_tokens
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its images."""
        self.messages: List[dict] = []
        self.images = []
        self.pending_image = None

    def attach(self, path: str) -> None:
        """Show the image at ``path`` with the next question."""
        self.pending_image = load_image(path)

    def prompt(self, question: str):
        """``(token ids, pixel values per image)`` of the conversation so far
        plus ``question`` (with the attached image), ready for an answer."""
        images = self.images + ([self.pending_image] if self.pending_image is not None else [])
        content = f'{IMAGE_TOKEN}\n{question}' if self.pending_image is not None else question
        messages = self.messages + [dict(role='user', content=content)]
        tokenizer = self.model.tokenizer
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        if self.model.kind == 'hf_llava':
            # The template already holds any bos token; training adds none either.
            inputs = self.model.processor(text=text, images=images or None,
                                          add_special_tokens=False, return_tensors='pt')
            pixels = image_inputs(inputs) if images else []
            return inputs['input_ids'][0].tolist(), pixels
        ids = tokenizer(text, add_special_tokens=False).input_ids
        image_id = self.model.image_token_id
        # Each image has its own number of <image> ids (AnyRes: by its size).
        inputs = [self.model.image_input(image) for image in images]
        counts = iter(count for count, _ in inputs)
        expanded = []
        for token in ids:
            expanded += [image_id] * next(counts) if token == image_id else [token]
        return expanded, [pixels for _, pixels in inputs]

    def _generate(self, ids, pixels, streamer) -> List[int]:
        return self.model.generate([ids], pixels or None, self.max_new_tokens,
                                   streamer=streamer)[0]

    def ask(self, question: str, out=None) -> str:
        """The model's answer to ``question`` in this conversation, streamed to
        ``out`` (None: not streamed) as it is generated; the turn is kept."""
        ids, pixels = self.prompt(question)
        streamer = WriteStreamer(self.model.tokenizer, out) if out is not None else None
        new = self._generate(ids, pixels, streamer)
        stop = set(self.model.end_of_turn_ids)
        end = next((i for i, token in enumerate(new) if token in stop), len(new))
        answer = self.model.tokenizer.decode(new[:end], skip_special_tokens=True).strip()
        user = f'{IMAGE_TOKEN}\n{question}' if self.pending_image is not None else question
        self.messages += [dict(role='user', content=user),
                          dict(role='assistant', content=answer)]
        if self.pending_image is not None:
            self.images.append(self.pending_image)
            self.pending_image = None
        return answer


def interact(session: ChatSession, read_line: Callable[[str], str], out=None) -> None:
    """The interactive loop: questions, ``/image PATH``, ``/reset``,
    ``/quit`` (or end of input), reading lines with ``read_line(prompt)``."""
    out = out or sys.stdout
    out.write(f"Ask a question; commands: {', '.join(COMMANDS)}\n")
    while True:
        try:
            line = read_line('user> ').strip()
        except EOFError:
            out.write('\n')
            return
        if not line:
            continue
        if line in ('/quit', '/exit'):
            return
        if line == '/reset':
            session.reset()
            out.write('(conversation and images cleared)\n')
        elif line.startswith('/image'):
            path = line[len('/image'):].strip()
            try:
                session.attach(path)
            except (OSError, ValueError) as err:
                out.write(f'cannot open {path!r}: {err}\n')
                continue
            out.write(f'(image {path} goes with the next question)\n')
        elif line.startswith('/'):
            out.write(f"unknown command {line.split()[0]!r}; commands: {', '.join(COMMANDS)}\n")
        else:
            out.write('assistant> ')
            session.ask(line, out)
