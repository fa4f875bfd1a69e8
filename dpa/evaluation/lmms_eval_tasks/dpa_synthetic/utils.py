"""Functions of the dpa_synthetic lmms-eval task (loaded by lmms-eval, which
imports this file by path: it must not import dpa)."""
import string

from PIL import Image


def doc_to_visual(doc):
    # The bridge rewrote every image path to an absolute one.
    return [Image.open(doc['image']).convert('RGB')] if doc.get('image') else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # llava_hf puts "<image>\n" before it and applies the chat template: the
    # prompt of dpa.evaluation.
    return doc['question']


def _normalize(text):
    return (text or '').lower().strip(string.punctuation + string.whitespace)


def process_results(doc, results):
    return {'exact_match': float(_normalize(results[0]) == _normalize(doc['answer']))}
