"""The language-prior-conflict diagnostic: how far the captions' language is
from what the LLM predicts, measured on the caption text alone, before any
image is involved.

Per caption source of a config: the mean negative log-likelihood per caption
token under the base LLM (and under the proxy LLM once stage 1 has run), and
the share of caption tokens the base LLM gives a probability below
``LOW_PROBABILITY``. The verdict is a rule of thumb, stated in the result:

- share >= ``STRONG``: strong conflict, the captions' style is far from the
  LLM's; the proxy stage (PMO) is expected to matter;
- share >= ``MODERATE``: moderate conflict;
- below: weak conflict, the LLM already predicts the captions' language;
- a base NLL of at least ``CHANCE_FRACTION`` x log(vocabulary size) is an LLM
  at chance (random weights, as the tiny stand-ins), whatever the share.
"""
import math
from typing import Dict, Optional

import torch

from dpa.analysis.relevance import analysis_rows
from dpa.datasets.llava import dpa_collate
from dpa.datasets.mixture import data_sources
from dpa.artifacts import read_manifest
from dpa.models.losses import IGNORE_INDEX, target_scores
from dpa.registry import DATASETS, MODELS

LOW_PROBABILITY = 0.01
STRONG, MODERATE = 0.30, 0.10
# An NLL this close to log(vocabulary) is a model at chance, not a conflict.
CHANCE_FRACTION = 0.9


@torch.no_grad()
def caption_log_probs(llm, samples) -> torch.Tensor:
    """Log-probabilities of every caption token (stage 1's targets) under ``llm``."""
    values = []
    for _, sample in samples:
        batch = dpa_collate([sample])
        logits = llm(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'],
                     use_cache=False).logits[0, :-1]
        targets = batch['labels'][0, 1:]
        supervised = targets != IGNORE_INDEX
        values.append(target_scores(logits[supervised], targets[supervised])[1])
    return torch.cat(values) if values else torch.zeros(0)


def verdict(low_share: float, nll: float, vocab_size: int) -> str:
    if nll >= CHANCE_FRACTION * math.log(vocab_size):
        return ('the base LLM predicts the captions no better than chance: random weights or '
                'the wrong checkpoint? (no conflict can be read off it)')
    if low_share >= STRONG:
        return ('strong conflict: the base LLM finds the captions\' language unlikely; '
                'expect the proxy stage (PMO) to matter')
    if low_share >= MODERATE:
        return 'moderate conflict between the captions\' language and the base LLM'
    return 'weak conflict: the base LLM already predicts the captions\' language'


def source_datasets(cfg) -> Dict[str, object]:
    """Stage 1's dataset of each caption source (caption text, no image)."""
    from dpa.engine.stage_config import stage_dataset_config
    base = stage_dataset_config(cfg, 'proxy')
    datasets = {}
    for name, source in data_sources(cfg[cfg.proxy.data]).items():
        dataset = {k: v for k, v in base.items() if k not in ('sources', 'seed')}
        dataset.update(type='LLaVADataset', data_files=source.data_files,
                       image_folder=source.get('image_folder', ''))
        datasets[name] = DATASETS.build(dataset)
    return datasets


def diagnose_prior(cfg, num: int = 200) -> dict:
    """The diagnostic of every caption source of ``cfg`` (already resolved:
    stand-ins, paths, data), on its first ``num`` usable rows."""
    llms = {'base': cfg.llm}
    proxy: Optional[dict] = read_manifest(cfg.work_dir, 'proxy', verify=True)
    if proxy is not None:
        llms['proxy'] = dict(type='ProxyLLMWrapper', llm=cfg.llm, adapter=proxy['artifact'])
    sources = {name: analysis_rows(dataset, num) for name, dataset in source_datasets(cfg).items()}
    log_probs = {}
    for which, llm_cfg in llms.items():
        llm = MODELS.build(llm_cfg).eval()
        vocab_size = llm.get_output_embeddings().out_features
        for name, (samples, _) in sources.items():
            log_probs[which, name] = caption_log_probs(llm, samples)
        del llm
    result = dict(low_probability=LOW_PROBABILITY,
                  thresholds=dict(strong=STRONG, moderate=MODERATE),
                  proxy=proxy['artifact'] if proxy else None, sources={})
    for name, (samples, skipped) in sources.items():
        base = log_probs['base', name]
        low_share = float((base.exp() < LOW_PROBABILITY).float().mean()) if base.numel() else 0.0
        entry = dict(rows=len(samples), tokens=int(base.numel()),
                     nll_base=float(-base.mean()) if base.numel() else None,
                     low_probability_share=low_share, skipped_rows=len(skipped),
                     verdict=verdict(low_share, float(-base.mean()) if base.numel() else 0.0,
                                     vocab_size))
        if ('proxy', name) in log_probs:
            entry['nll_proxy'] = float(-log_probs['proxy', name].mean())
        result['sources'][name] = entry
    return result


def format_prior_table(result: dict) -> str:
    lines = [f"{'source':<20} {'rows':>5} {'tokens':>7} {'NLL base':>9} {'NLL proxy':>10} "
             f"{'p<' + str(result['low_probability']):>8}  verdict"]
    for name, s in result['sources'].items():
        proxy = f"{s['nll_proxy']:.3f}" if 'nll_proxy' in s else '-'
        lines.append(f"{name:<20} {s['rows']:>5} {s['tokens']:>7} {s['nll_base']:>9.3f} "
                     f"{proxy:>10} {s['low_probability_share']:>8.1%}  {s['verdict']}")
    if result['proxy'] is None:
        lines.append('(no proxy column: stage 1 has not run in this work dir)')
    return '\n'.join(lines)
