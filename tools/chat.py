"""Chat with a trained model.

    python tools/chat.py WORK_DIR_OR_MODEL_DIR [--image PATH]     # interactive
    python tools/chat.py WORK_DIR_OR_MODEL_DIR --image PATH --prompt "What is shown?"

WORK_DIR_OR_MODEL_DIR is a finished work dir (its final model), a native model
dir (``dpa_model.json``) or an ``hf_llava`` export, as for tools/eval.py.
Interactive commands: ``/image PATH`` (show an image with the next question),
``/reset`` (forget the conversation), ``/quit``. Answers are greedy, streamed,
and end at the chat template's end-of-turn token. Exit status 1 when the model
or image cannot be loaded.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from transformers.utils import logging as hf_logging  # noqa: E402

import dpa  # noqa: E402,F401
from dpa.evaluation.chat import ChatSession, interact  # noqa: E402
from dpa.evaluation.models import ModelLoadError, default_device, load_eval_model  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Chat with a trained multimodal LLM')
    parser.add_argument('model', help='work dir, native model dir or hf_llava dir')
    parser.add_argument('--image', help='image shown with the first question')
    parser.add_argument('--prompt', help='answer this one question and exit (not interactive)')
    parser.add_argument('--max-new-tokens', type=int, default=256, help='longest answer')
    parser.add_argument('--device', help='cpu, cuda, cuda:1, ... (default: cuda if available)')
    parser.add_argument('--no-verify', action='store_true',
                        help="load the model without checking its files against its "
                        "manifest's sha256 (for very large checkpoints you trust)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # the weight-loading bars
    try:
        model = load_eval_model(args.model, args.device or default_device(),
                                verify=not args.no_verify)
    except ModelLoadError as err:
        sys.exit(f'chat error: {err}')
    session = ChatSession(model, args.max_new_tokens)
    if args.image:
        try:
            session.attach(args.image)
        except (OSError, ValueError) as err:
            sys.exit(f'chat error: cannot open --image {args.image!r}: {err}')
    if args.prompt is not None:
        session.ask(args.prompt, sys.stdout)
        return
    interact(session, input)


if __name__ == '__main__':
    main()
