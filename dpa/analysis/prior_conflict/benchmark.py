"""Runs the variants of the prior-conflict benchmark over seeds and tables
the result: per-attribute and mean accuracy, mean +- std over seeds, the
paired difference to vanilla, chance, the no-image control, and the align
stage's CMO weights on content and on style (template) tokens; and what
each align stage's projector tells the LLM it was aligned against (the
probability of the caption's colour, shape, position and style tokens with
and without the image).

Two priors: ``toy`` (a tiny LLM pre-trained here on style A, then gated) and
``smollm2`` (SmolLM2-135M-Instruct's real prior, gated by
:mod:`dpa.analysis.prior_conflict.real_prior`; asked in English)."""
import json
import math
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

from mmengine.config import Config

from dpa.analysis.prior_conflict.data import data_settings, make_benchmark_data
from dpa.analysis.prior_conflict.language import ATTRIBUTES
from dpa.analysis.prior_conflict.prior_llm import pretrain_prior
from dpa.analysis.prior_conflict.real_prior import check_real_prior
from dpa.analysis.relevance import read_jsonl
from dpa.engine.config_file import parse_cfg_options
from dpa.engine.config_guard import check_cfg_options
from dpa.errors import ConfigError

REPO = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
VARIANTS = ('vanilla', 'cal', 'pmo_only', 'cmo_only', 'dpa')
# DPA with CMO in one stage only; not run unless named (--variants).
EXTRA_VARIANTS = ('pmo_cmo_align', 'pmo_cmo_finetune')
ALL_VARIANTS = VARIANTS + EXTRA_VARIANTS
USES_PROXY = ('pmo_only', 'dpa') + EXTRA_VARIANTS
CHANCE = statistics.mean(1 / len(values) for values in ATTRIBUTES.values())
# Caption rows the align projector is analysed on (tools/analyze_relevance.py).
RELEVANCE_ROWS = 60
TOKEN_CLASSES = tuple(ATTRIBUTES) + ('style', )
BUDGET_KEYS = ('token_share', 'loss_share', 'below_floor', 'at_floor')
# A comparison counts only when vanilla learnt something from the image and
# the questions cannot be answered without it: every variant's no-image
# control, averaged over its seeds, within GATE_NO_IMAGE_MARGIN of chance.
# The mean, not each run: at the real prior's 72 questions one run's control
# has a standard deviation of 0.048 at chance, so the largest of 9 at-chance
# runs exceeds 0.24 (17 of 72) in about 88% of sweeps (binomial, docs/prior_conflict.md).
GATE_VANILLA_MEAN, GATE_NO_IMAGE_MARGIN = 0.30, 0.05


# Per prior: its variant configs, the folder of its cached data (under
# --data-root), the data's wording and sizes.
PRIORS = {
    'toy': dict(configs='configs/prior_conflict', root='prior_conflict', data={}),
    # Sized so that one variant at one seed trains and scores in minutes on
    # one CPU thread (docs/prior_conflict.md, "A real prior").
    'smollm2': dict(configs='configs/prior_conflict/smollm2', root='prior_conflict_smollm2',
                    data=dict(wording='natural', num_captions=320, num_instructions=160,
                              num_eval=24, image_size=56)),
}


def variant_config(variant: str, prior: str = 'toy') -> str:
    return osp.join(REPO, PRIORS[prior]['configs'], f'{variant}.py')


def prepare_prior(prior: str, data_root: str, log: Callable[[str], None] = print) -> dict:
    """The toy prior pre-trained (cached), or the real one's gates checked
    (cached); their results. Raises PriorGateError when a gate fails."""
    root = osp.join(data_root, PRIORS[prior]['root'])
    if prior == 'toy':
        return pretrain_prior(osp.join(root, 'prior_llm'), log=log)
    return check_real_prior(variant_config('dpa', prior), data_root, root, log=log)


def _run(command: List[str], log_path: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    with open(log_path, 'w') as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f'{" ".join(command)} failed (exit {done.returncode}); see {log_path}')


def _train(config: str, work_dir: str, options: Sequence[str], *args: str) -> None:
    os.makedirs(work_dir, exist_ok=True)
    _run([sys.executable, osp.join(REPO, 'tools', 'train.py'), config, '--work-dir', work_dir,
          *args, '--cfg-options', *options], osp.join(work_dir, 'train.log'))


def proxy_dir(out_dir: str, seed: int) -> str:
    return osp.join(out_dir, f'proxy_seed{seed}')


def run_dir(out_dir: str, variant: str, seed: int) -> str:
    return osp.join(out_dir, f'{variant}_seed{seed}')


def _seed_options(seed: int, data_root: str, extra: Sequence[str]) -> List[str]:
    return [f'seed={seed}', f'data_root={data_root}', *extra]


def _options(variant: str, seed: int, data_root: str, out_dir: str,
             extra: Sequence[str] = ()) -> List[str]:
    """A variant's ``--cfg-options`` at one seed; one with a proxy reuses the seed's."""
    options = _seed_options(seed, data_root, extra)
    if variant in USES_PROXY:
        options.append(f'proxy.from_work_dir={proxy_dir(out_dir, seed)}')
    return options


def token_class(token: str) -> str:
    """``colour``, ``shape``, ``position`` (a caption's content words) or
    ``style`` (everything else: brackets, slash, full stop, end of turn).
    A real tokenizer's token keeps its leading space (" red")."""
    for name, values in ATTRIBUTES.items():
        if token.strip() in values:
            return name
    return 'style'


def projector_relevance(records: Sequence[dict]) -> Dict[str, dict]:
    """Per token class of ``tools/analyze_relevance.py`` records: how many
    tokens, the mean probability with the image (``p_img``) and without it
    (``p_txt``), and the mean CMO weight.

    A token with nothing before it but the image (a caption's first token
    under the plain template) has no probability without the image: its
    record repeats ``p_img`` as ``p_txt`` (weight delta_min). Such tokens are
    left out, so a class compares real no-image probabilities.
    """
    classes: Dict[str, List[dict]] = {}
    for record in records:
        if record['p_img'] != record['p_txt']:
            classes.setdefault(token_class(record['token']), []).append(record)
    return {name: dict(tokens=len(rows), p_img=statistics.mean(r['p_img'] for r in rows),
                       p_txt=statistics.mean(r['p_txt'] for r in rows),
                       weight=statistics.mean(r['weight'] for r in rows))
            for name, rows in classes.items()}


def weight_budget(records: Sequence[dict], delta_min: float) -> Dict[str, dict]:
    """Where a CMO loss's weight goes, per token class, over every supervised
    token of the records: the share of the tokens (``token_share``) and of
    the summed weight (``loss_share``: the normalised loss sum w CE / sum w
    gives a class this share of the gradient's weight, where a plain mean
    gives it ``token_share``), the share whose raw ``p_img - p_txt`` is at
    most ``delta_min`` (``below_floor``: the clamp's floor decides them) and
    the share whose weight, after smoothing, is still the floor
    (``at_floor``)."""
    total_weight = sum(r['weight'] for r in records) or 1.0
    classes: Dict[str, List[dict]] = {}
    for record in records:
        classes.setdefault(token_class(record['token']), []).append(record)
    return {name: dict(token_share=len(rows) / len(records),
                       loss_share=sum(r['weight'] for r in rows) / total_weight,
                       below_floor=statistics.mean(r['delta'] <= delta_min for r in rows),
                       at_floor=statistics.mean(r['weight'] <= delta_min + 1e-6 for r in rows))
            for name, rows in classes.items()}


def relevance_of_run(work_dir: str, cfg: Config) -> dict:
    """``align_relevance`` (:func:`projector_relevance`) of a run's records
    in ``<work_dir>/relevance``, and ``align_budget`` (:func:`weight_budget`)
    when its align loss (in ``cfg``, the run's config) weights tokens."""
    records = read_jsonl(osp.join(work_dir, 'relevance', 'tokens.jsonl'))
    out = dict(align_relevance=projector_relevance(records))
    loss = cfg.align.loss
    if loss.mode != 'vanilla':
        out['align_budget'] = weight_budget(records, loss.clamp[0])
    return out


def align_relevance(variant: str, seed: int, data_root: str, out_dir: str,
                    extra: Sequence[str] = (), prior: str = 'toy') -> dict:
    """Analyse a finished run's align stage against the LLM it was aligned
    against (the proxy or the base LLM) on the first caption rows; written to
    ``<run>/relevance`` and summarised by token class."""
    work_dir = run_dir(out_dir, variant, seed)
    relevance_dir = osp.join(work_dir, 'relevance')
    _run([sys.executable, osp.join(REPO, 'tools', 'analyze_relevance.py'),
          variant_config(variant, prior), '--work-dir', work_dir, '--stage', 'align', '--model',
          'trained', '--num', str(RELEVANCE_ROWS), '--out', relevance_dir, '--cfg-options',
          *_options(variant, seed, data_root, out_dir, extra)],
         osp.join(work_dir, 'relevance.log'))
    return relevance_of_run(work_dir, variant_cfg(variant, prior, extra))


def run_variant(variant: str, seed: int, data_root: str, out_dir: str,
                paths: dict, extra: Sequence[str] = (), prior: str = 'toy') -> dict:
    """Train one variant at one seed (its eval stage scores it; a variant with
    a proxy reuses the seed's, see :func:`run_benchmark`), score the no-image
    control, and collect the numbers."""
    work_dir = run_dir(out_dir, variant, seed)
    start = time.time()
    _train(variant_config(variant, prior), work_dir,
           _options(variant, seed, data_root, out_dir, extra))
    control_dir = osp.join(work_dir, 'no_image')
    _run([sys.executable, osp.join(REPO, 'tools', 'eval.py'), work_dir, '--data',
          paths['eval_no_image'], '--image-folder', paths['image_folder'], '--out', control_dir,
          '--batch-size', '64', '--device', 'cpu'], osp.join(work_dir, 'no_image.log'))
    with open(osp.join(work_dir, 'eval', 'manifest.json')) as f:
        metrics = json.load(f)['metrics']
    with open(osp.join(control_dir, 'metrics.json')) as f:
        control = json.load(f)
    with open(osp.join(work_dir, 'align', 'manifest.json')) as f:
        cmo = json.load(f).get('cmo', {})
    relevance = align_relevance(variant, seed, data_root, out_dir, extra, prior)
    return dict(variant=variant, seed=seed, seconds=round(time.time() - start),
                accuracy={name: metrics['per_type'][name]['accuracy'] for name in ATTRIBUTES},
                mean=statistics.mean(metrics['per_type'][name]['accuracy']
                                     for name in ATTRIBUTES),
                no_image=control['accuracy'],
                align_weight_content=cmo.get('w_mean_content'),
                align_weight_style=cmo.get('w_mean_template'),
                align_at_min=cmo.get('at_min'), **relevance)


def check_options(variants: Sequence[str], extra: Sequence[str], prior: str = 'toy') -> None:
    """Refuse ``--cfg-options`` a variant's config does not take before
    anything trains (the runs would fail one by one in their logs).

    Raises:
        ConfigError: naming the key and the variant.
    """
    if not extra:
        return
    for variant in variants:
        try:
            check_cfg_options(Config.fromfile(variant_config(variant, prior)),
                              _parse_options(extra))
        except ConfigError as err:
            raise ConfigError(f'{variant}: {err}') from None


def _parse_options(extra: Sequence[str]) -> dict:
    return parse_cfg_options(list(extra))


def variant_cfg(variant: str, prior: str = 'toy', extra: Sequence[str] = ()) -> Config:
    """A variant's config with the sweep's ``--cfg-options`` merged."""
    cfg = Config.fromfile(variant_config(variant, prior))
    if extra:
        cfg.merge_from_dict(_parse_options(extra))
    return cfg


def run_benchmark(variants: Sequence[str], seeds: Sequence[int], data_root: str, out_dir: str,
                  parallel: int = 2, log: Callable[[str], None] = print,
                  extra: Sequence[str] = (), prior: str = 'toy') -> dict:
    """Prior LLM and data (cached under ``data_root/<PRIORS[prior]['root']>``),
    then every (variant, seed), ``parallel`` at a time; writes ``results.json``
    and ``results.md`` to ``out_dir``. ``extra``: more ``--cfg-options``
    (``key=value``) for every run, e.g. ``align.max_epochs=16``; ``prior``: a
    key of :data:`PRIORS`."""
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        raise ValueError(f'unknown variants {sorted(unknown)}; choose among {ALL_VARIANTS}')
    if prior not in PRIORS:
        raise ValueError(f'unknown prior {prior!r}; choose among {sorted(PRIORS)}')
    check_options(variants, extra, prior)
    gates = prepare_prior(prior, data_root, log)
    paths = make_benchmark_data(osp.join(data_root, PRIORS[prior]['root'], 'data'),
                                **PRIORS[prior]['data'])
    os.makedirs(out_dir, exist_ok=True)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        # One proxy per seed, shared by the variants that use it.
        proxies = [pool.submit(_train, variant_config('dpa', prior), proxy_dir(out_dir, seed),
                               _seed_options(seed, data_root, extra), '--stage', 'proxy')
                   for seed in seeds if set(variants) & set(USES_PROXY)]
        for future in proxies:
            future.result()
    jobs = [(v, s) for s in seeds for v in variants]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {job: pool.submit(run_variant, job[0], job[1], data_root, out_dir, paths,
                                    extra, prior)
                   for job in jobs}
        runs = []
        for job, future in futures.items():
            runs.append(future.result())
            log(f"{job[0]} seed {job[1]}: mean {runs[-1]['mean']:.3f} "
                f"({runs[-1]['seconds']} s)")
    result = dict(prior=gates, prior_llm=prior, runs=runs, chance=CHANCE,
                  table=summarise(runs), cfg_options=list(extra),
                  data=data_params(prior))
    write_results(result, out_dir)
    return result


def write_results(result: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(osp.join(out_dir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=2)
    with open(osp.join(out_dir, 'results.md'), 'w') as f:
        f.write(format_table(result['table']) + '\n')


def _probability(value: float) -> str:
    return f'{value:.3f}' if value >= 0.001 else f'{value:.1e}'


def _mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return f'{values[0]:.3f}'
    return f'{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}'


def paired_t(differences: Sequence[float]) -> Optional[float]:
    """The paired t statistic of per-seed differences (mean over its
    standard error); None under two seeds, +-inf when they are all equal and
    not zero."""
    if len(differences) < 2:
        return None
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    if sd == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / (sd / math.sqrt(len(differences)))


def summarise(runs: List[dict]) -> dict:
    """Per variant: accuracies over seeds, the paired difference to vanilla,
    the no-image control, CMO weights; and whether the gates passed."""
    by_variant: Dict[str, List[dict]] = {}
    for run in runs:
        by_variant.setdefault(run['variant'], []).append(run)
    vanilla = {r['seed']: r for r in by_variant.get('vanilla', [])}
    table = {}
    for variant, rows in by_variant.items():
        rows = sorted(rows, key=lambda r: r['seed'])
        entry = dict(seeds=[r['seed'] for r in rows],
                     mean=[r['mean'] for r in rows],
                     no_image=[r['no_image'] for r in rows],
                     **{name: [r['accuracy'][name] for r in rows] for name in ATTRIBUTES})
        if vanilla and variant != 'vanilla':
            entry['paired_vs_vanilla'] = [r['mean'] - vanilla[r['seed']]['mean']
                                          for r in rows if r['seed'] in vanilla]
        weights = [(r['align_weight_content'], r['align_weight_style']) for r in rows
                   if r['align_weight_content'] is not None]
        if weights:
            entry['align_weight_content'] = statistics.mean(w[0] for w in weights)
            entry['align_weight_style'] = statistics.mean(w[1] for w in weights)
            entry['align_at_min'] = statistics.mean(r['align_at_min'] for r in rows)
        relevance = [r['align_relevance'] for r in rows if r.get('align_relevance')]
        if relevance:
            entry['align_relevance'] = {
                name: {key: [r[name][key] for r in relevance if name in r]
                       for key in ('p_img', 'p_txt', 'weight')}
                for name in TOKEN_CLASSES}
        budgets = [r['align_budget'] for r in rows if r.get('align_budget')]
        if budgets:
            entry['align_budget'] = {
                name: {key: statistics.mean(b[name][key] for b in budgets if name in b)
                       for key in BUDGET_KEYS}
                for name in TOKEN_CLASSES if any(name in b for b in budgets)}
        table[variant] = entry
    gates = {}
    if 'vanilla' in table:
        gates['vanilla_mean'] = statistics.mean(table['vanilla']['mean'])
    gates['no_image_means'] = {v: statistics.mean(e['no_image']) for v, e in table.items()}
    gates['no_image_max'] = max(x for e in table.values() for x in e['no_image'])
    gates['passed'] = (gates.get('vanilla_mean', 0) >= GATE_VANILLA_MEAN
                       and max(gates['no_image_means'].values())
                       <= CHANCE + GATE_NO_IMAGE_MARGIN)
    return dict(variants=table, gates=gates, chance=CHANCE)


def format_table(table: dict) -> str:
    names = list(ATTRIBUTES)
    lines = ['| variant | ' + ' | '.join(names) + ' | mean | vs vanilla (paired, per seed) '
             '| no image | CMO weight content / style (align) |',
             '|---' * (len(names) + 5) + '|']
    for variant in [v for v in ALL_VARIANTS if v in table['variants']]:
        e = table['variants'][variant]
        paired = ', '.join(f'{d:+.3f}' for d in e.get('paired_vs_vanilla', [])) or '-'
        t = paired_t(e.get('paired_vs_vanilla', []))
        if t is not None:
            paired += (f" (mean {statistics.mean(e['paired_vs_vanilla']):+.3f}, "
                       f"t = {t:+.2f}, {len(e['paired_vs_vanilla']) - 1} df)")
        weights = (f"{e['align_weight_content']:.3f} / {e['align_weight_style']:.3f}"
                   if 'align_weight_content' in e else '- (vanilla loss)')
        lines.append(f'| {variant} | ' + ' | '.join(_mean_std(e[n]) for n in names)
                     + f" | {_mean_std(e['mean'])} | {paired} | {_mean_std(e['no_image'])} | "
                     f'{weights} |')
    g = table['gates']
    lines.append('')
    worst = max(g['no_image_means'], key=g['no_image_means'].get)
    vanilla = (f"vanilla mean {g['vanilla_mean']:.3f}" if 'vanilla_mean' in g
               else 'vanilla not run')
    measured = (f"{vanilla}; largest mean "
                f"no-image control {g['no_image_means'][worst]:.3f} ({worst}), largest "
                f"single run {g['no_image_max']:.3f}")
    lines.append(f"chance {table['chance']:.3f}; gates (vanilla mean >= {GATE_VANILLA_MEAN}, "
                 "each variant's no-image control, mean over seeds, <= chance + "
                 f"{GATE_NO_IMAGE_MARGIN} = {table['chance'] + GATE_NO_IMAGE_MARGIN:.3f}): "
                 + ('passed' if g['passed'] else 'NOT passed, the comparison does not count')
                 + f' ({measured})')
    relevance = [v for v in ALL_VARIANTS if 'align_relevance' in table['variants'].get(v, {})]
    if relevance:
        chance = ' / '.join(f'1/{len(values)}' for values in ATTRIBUTES.values())
        lines += ['', "What each align stage's projector tells the LLM it was aligned against "
                  f'(the first {RELEVANCE_ROWS} caption rows; mean probability of the caption '
                  f'token with the image / without it; chance {chance}):', '',
                  '| variant | aligned against | '
                  + ' | '.join(TOKEN_CLASSES) + ' | CMO weight ' + ' / '.join(TOKEN_CLASSES)
                  + ' |', '|---' * (len(TOKEN_CLASSES) + 3) + '|']
        for variant in relevance:
            classes = table['variants'][variant]['align_relevance']
            cells = [f"{_probability(statistics.mean(classes[n]['p_img']))} / "
                     f"{_probability(statistics.mean(classes[n]['p_txt']))}"
                     if classes[n]['p_img'] else '-' for n in TOKEN_CLASSES]
            weights = ' / '.join(f"{statistics.mean(classes[n]['weight']):.3f}"
                                 if classes[n]['weight'] else '-' for n in TOKEN_CLASSES)
            against = 'proxy' if variant in USES_PROXY else 'base LLM'
            lines.append(f'| {variant} | {against} | ' + ' | '.join(cells) + f' | {weights} |')
    budget = [v for v in ALL_VARIANTS if 'align_budget' in table['variants'].get(v, {})]
    if budget:
        lines += ['', "Where the align stage's weighted loss puts its weight (the same tokens, "
                  'every supervised one; per class: share of the tokens / share of the summed '
                  'weight, i.e. of sum w CE / sum w; raw p_img - p_txt at or under the floor; '
                  'weight at the floor after smoothing):', '',
                  '| variant | class | tokens | weight | raw delta <= floor | weight at floor |',
                  '|---|---|---|---|---|---|']
        for variant in budget:
            for name, b in table['variants'][variant]['align_budget'].items():
                lines.append(f"| {variant} | {name} | {b['token_share']:.3f} | "
                             f"{b['loss_share']:.3f} | {b['below_floor']:.3f} | "
                             f"{b['at_floor']:.3f} |")
    return '\n'.join(lines)


def data_params(prior: str) -> dict:
    """The settings the benchmark's data of ``prior`` is made with."""
    return data_settings(**PRIORS[prior]['data'])


# What must be equal in results merged into one table: the prior, the
# sweep's --cfg-options and the data (None where a file predates the key).
_MERGE_KEYS = ('prior_llm', 'cfg_options', 'data')


def merge_results(paths: Sequence[str]) -> dict:
    """One table from several ``results.json`` (e.g. more seeds run later);
    a (variant, seed) in two files is an error, and so are files whose
    prior, ``--cfg-options`` or data differ (their runs answer different
    questions). A run whose relevance records lie beside its
    ``results.json`` is summarised again from them (the records are the
    source; the summary may be newer than the run)."""
    runs, seen, prior, settings = [], set(), None, None
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        these = {key: result.get(key) for key in _MERGE_KEYS}
        these['prior_llm'] = these['prior_llm'] or 'toy'
        if settings is None:
            settings, first = these, path
        elif these != settings:
            differ = {key: (settings[key], these[key]) for key in _MERGE_KEYS
                      if settings[key] != these[key]}
            raise ValueError(f'{path} and {first} were run with different settings, so their '
                             f'runs do not belong in one table: {differ}. Merge results of '
                             'the same --llm, --cfg-options and data only.')
        prior = prior or result.get('prior')
        out_dir = osp.dirname(osp.abspath(path))
        for run in result['runs']:
            key = (run['variant'], run['seed'])
            if key in seen:
                raise ValueError(f'{run["variant"]} seed {run["seed"]} is in two of {list(paths)}')
            seen.add(key)
            work_dir = run_dir(out_dir, run['variant'], run['seed'])
            if osp.isfile(osp.join(work_dir, 'relevance', 'tokens.jsonl')):
                cfg = variant_cfg(run['variant'], result.get('prior_llm', 'toy'),
                                  result.get('cfg_options', ()))
                run = dict(run, **relevance_of_run(work_dir, cfg))
            runs.append(run)
    return dict(prior=prior, runs=runs, chance=CHANCE, table=summarise(runs), **settings)
