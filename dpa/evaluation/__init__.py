"""Scoring a trained model: the built-in evaluator (multiple choice by option
log-likelihood, open questions by greedy generation), the pipeline's optional
``eval`` stage, and the bridge to lmms-eval."""
from dpa.evaluation.data import EvalDataError, normalize_answer, read_eval_rows
from dpa.evaluation.evaluator import (BadRowsError, compute_metrics, evaluate, format_table,
                                      predict)
from dpa.evaluation.models import ModelLoadError, load_eval_model
from dpa.evaluation.stage import EvalStage

__all__ = ['BadRowsError', 'EvalDataError', 'EvalStage', 'ModelLoadError', 'compute_metrics',
           'evaluate', 'format_table', 'load_eval_model', 'normalize_answer', 'predict',
           'read_eval_rows']
