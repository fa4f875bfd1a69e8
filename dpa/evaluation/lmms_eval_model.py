"""``dpa``: the project's evaluation models as an lmms-eval model.

    python -m lmms_eval --model dpa --model_args pretrained=WORK_DIR_OR_MODEL_DIR ...

Registered through the ``lmms_eval.models`` entry-point group (setup.cfg), the
way lmms-eval 0.7 loads external models, so it exists in any environment where
lmms-eval and this project are installed (``pip install -e .``). This module
imports lmms-eval: only that environment imports it.

It loads ``pretrained`` with :func:`dpa.evaluation.models.load_eval_model`
(a work dir, a native model dir or an ``hf_llava`` export: every family,
InternLM2 included, and AnyRes models) and answers with the built-in
evaluator's own functions, so a row is scored exactly as ``tools/eval.py``
scores it:

- ``generate_until``: the prompt of :meth:`prompt` (chat template, image first),
  greedy generation cut at the end-of-turn token, then at the task's ``until``
  strings; sampling and beam search are refused (the evaluator decodes greedily).
- ``loglikelihood`` (lmms-eval's multiple choice): the continuation's token
  log-probabilities summed after the prompt, as the built-in evaluator scores
  an option (one pass over a document's prompt, its options continuing from
  the prompt's keys and values). The first value returned is their negation,
  a loss: lmms-eval 0.7.3's models return losses and its multiple-choice
  scoring picks the smallest, which is then the built-in evaluator's best
  option.

One process (no ``accelerate`` data parallelism); at most one image a request.
"""
import logging
from itertools import groupby
from typing import List, Optional

from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from mmengine.logging import print_log
from PIL import Image

from dpa.evaluation.evaluator import (MAX_NEW_TOKENS, generate_answers, group_batches,
                                      option_ids, score_continuations)
from dpa.evaluation.models import default_device, load_eval_model
from dpa.models.builders import IMAGE_TOKEN

MODEL_ID = 'dpa'


def manifest() -> ModelManifest:
    """The entry point lmms-eval reads (group ``lmms_eval.models``)."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f'{__name__}.DPALmmsModel')


class DPALmmsModel(lmms):
    """Args (``--model_args``; ``--device`` and ``--batch_size`` arrive too):
        pretrained: a work dir, native model dir or ``hf_llava`` dir.
        device: ``cpu``, ``cuda``, ``cuda:1`` ... (default: cuda if available).
        batch_size: requests per forward pass, a document's kept together
            (predictions do not depend on it).
        pad_to_square: native models: ``True``/``False`` overrides the recorded
            image preprocessing, as ``tools/eval.py --pad-to-square`` does.
    """

    def __init__(self, pretrained: str, device: Optional[str] = None, batch_size=1,
                 pad_to_square: Optional[bool] = None):
        super().__init__()
        self.model = load_eval_model(pretrained, device or default_device(), pad_to_square)
        self.batch_size = int(batch_size)
        self._last_prompt = (None, None)
        self._warned_placeholder = False

    def _visual(self, doc_to_visual, task, split, doc_id) -> Optional[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1 or any(not isinstance(v, Image.Image) for v in visuals):
            raise ValueError(f'{task} doc {doc_id}: the dpa model takes at most one image a '
                             f'request, got {[type(v).__name__ for v in visuals]}')
        return visuals[0].convert('RGB') if visuals else None

    def _question(self, context: str) -> str:
        # The model was trained with the image before the text: a task's own
        # placeholder is dropped and the image goes first, as in training.
        if IMAGE_TOKEN not in context:
            return context
        if not self._warned_placeholder:
            print_log(f'the task writes {IMAGE_TOKEN} in its prompt: dropped, the image goes '
                      'first as in training', logger='current', level=logging.WARNING)
            self._warned_placeholder = True
        return context.replace(f'{IMAGE_TOKEN}\n', '').replace(IMAGE_TOKEN, '')

    def prompt(self, context: str, doc_to_visual, doc_id, task, split):
        """``(ids, pixel values)`` of a request. The last one is kept: a
        multiple-choice document's requests come one after the other."""
        key = (task, split, doc_id, context)
        if self._last_prompt[0] != key:
            image = self._visual(doc_to_visual, task, split, doc_id)
            self._last_prompt = (key, self.model.prompt(self._question(context), image))
        return self._last_prompt[1]

    def _chunks(self, requests):
        # One forward pass's worth at a time: no benchmark's images all in memory.
        for start in range(0, len(requests), self.batch_size):
            yield requests[start:start + self.batch_size]

    @staticmethod
    def _prompt_key(request):
        if len(request.args) == 2:  # unconditional: the context alone, no image
            return (request.args[0],)
        context, _, _, doc_id, task, split = request.args
        return task, split, doc_id, context

    def loglikelihood(self, requests) -> List[GenerationResult]:
        """``(loss, is_greedy)`` of each request: the continuation's summed
        negative log-probability and whether greedy decoding produces it.

        A document's requests (its options, one after the other) stay in one
        chunk of about ``batch_size`` requests, so that their prompt runs
        once (see :func:`score_continuations`)."""
        results = []
        runs = [list(run) for _, run in groupby(requests, key=self._prompt_key)]
        for batch in group_batches(runs, self.batch_size):
            chunk = [request for run in batch for request in run]
            items = []
            for request in chunk:
                if len(request.args) == 2:  # acc_mutual_info's unconditional requests: no image
                    context, continuation = request.args
                    ids, pixels = self.model.prompt(context, None)
                else:
                    context, continuation, doc_to_visual, doc_id, task, split = request.args
                    ids, pixels = self.prompt(context, doc_to_visual, doc_id, task, split)
                items.append((ids, pixels, option_ids(self.model.tokenizer, continuation)))
            # Wrapped: lmms-eval 0.7.3 turns any other result that is not text into
            # a string before scoring (api/instance.py, unwrap_generation_output),
            # and its multiple-choice scoring then fails ("too many values to
            # unpack"); a GenerationResult reaches it unchanged.
            results += [GenerationResult((-logp, greedy))
                        for logp, greedy in score_continuations(self.model, items,
                                                                self.batch_size)]
        return results

    def generate_until(self, requests) -> List[str]:
        answers = []
        for chunk in self._chunks(requests):
            prompts, stops, lengths = [], [], []
            for request in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                gen_kwargs = gen_kwargs or {}
                if gen_kwargs.get('do_sample') or (gen_kwargs.get('temperature') or 0) > 0 \
                        or (gen_kwargs.get('num_beams') or 1) > 1:
                    raise ValueError(f'{task}: the dpa model decodes greedily (as tools/eval.py '
                                     f'does); the task asks {gen_kwargs}')
                until = gen_kwargs.get('until') or []
                until = [until] if isinstance(until, str) else until
                stops.append([stop for stop in until if stop])
                lengths.append(int(gen_kwargs.get('max_new_tokens') or MAX_NEW_TOKENS))
                prompts.append(self.prompt(context, doc_to_visual, doc_id, task, split))
            if len(set(lengths)) == 1:
                texts = generate_answers(self.model, prompts, len(prompts), lengths[0])
            else:  # greedy answers do not depend on the batch: one at a time is the same
                texts = [generate_answers(self.model, [p], 1, n)[0]
                         for p, n in zip(prompts, lengths)]
            for text, until in zip(texts, stops):
                for stop in until:
                    text = text.split(stop)[0]
                answers.append(text)
        return answers

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError('the dpa model answers single-turn requests')
