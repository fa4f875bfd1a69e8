"""Functions of the dpa_synthetic and dpa_synthetic_mc lmms-eval tasks (loaded
by lmms-eval, which imports this file by path: it must not import dpa)."""
import string

from PIL import Image


def doc_to_visual(doc):
    # The bridge rewrote every image path to an absolute one.
    return [Image.open(doc['image']).convert('RGB')] if doc.get('image') else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # The model puts "<image>\n" before it and applies its chat template: the
    # prompt of dpa.evaluation.
    return doc['question']


def doc_to_target(doc):
    """The answer's index among the options (multiple choice)."""
    return doc['options'].index(doc['answer'])


def _normalize(text):
    return (text or '').lower().strip(string.punctuation + string.whitespace)


def process_results(doc, results):
    return {'exact_match': float(_normalize(results[0]) == _normalize(doc['answer']))}
