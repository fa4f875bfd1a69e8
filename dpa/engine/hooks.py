"""DPAHook: the stage's hand-off to the next one, its training statistics, and
the accounting of skipped bad data rows."""
import json
import os.path as osp
from collections import Counter
from typing import Optional

import torch
from mmengine.dist import (all_gather_object, barrier, get_rank, get_world_size,
                           is_main_process)
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import build_from_cfg
from safetensors.torch import save_file

from dpa.artifacts import ARTIFACT_DIR, write_artifact_dir, write_manifest
from dpa.engine.fsdp import gather_full_weights
from dpa.engine.staleness import STAGE_CONFIG_KEY
from dpa.models.builders import PROCESSORS
from dpa.models.export import export_llava, save_native
from dpa.models.export_base import ExportUnsupported
from dpa.models.proxy import FINETUNE_ADAPTER_DIR, has_lora, merge_lora
from dpa.registry import HOOKS

STAT_KEYS = ('cmo_w_mean', 'cmo_at_min', 'cmo_at_max', 'cmo_delta_mean',
             # By token class (dpa.models.token_classes); absent when a batch
             # has no token of the class, so averaged over the batches that have.
             'cmo_w_mean_content', 'cmo_w_mean_template', 'cmo_delta_mean_content',
             'cmo_delta_mean_template')
ARTIFACT_KINDS = ('adapter', 'projector', 'model')
SKIPPED_FILE = 'skipped_samples.jsonl'


# PEFT keeps these as sets and writes them in set order, which changes from
# one process to the next: two identical runs gave different bytes.
ADAPTER_SET_KEYS = ('target_modules', 'exclude_modules', 'modules_to_save')


def sort_adapter_config(out_dir: str) -> None:
    """Rewrite a saved ``adapter_config.json`` with its set-valued lists
    sorted, in PEFT's own layout (indent 2, sorted keys)."""
    path = osp.join(out_dir, 'adapter_config.json')
    with open(path, encoding='utf-8') as f:
        config = json.load(f)
    for key in ADAPTER_SET_KEYS:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    with open(path, 'w', encoding='utf-8') as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The seed of torch's generator for one iteration of one process."""
    return ((seed * 1_000_003 + iteration) * 65_537 + rank) % (1 << 63)


@HOOKS.register_module()
class IterationSeedHook(Hook):
    """Seeds torch's generator from (seed, iteration, rank) before every
    iteration. Dropout (LoRA's ``lora_dropout``) draws from it, each process
    as many numbers as its batches' shapes ask, so the state after N
    iterations differs between ranks and is in no checkpoint: seeded per
    iteration, a resumed stage draws what the uninterrupted one did, on every
    rank, under DDP or FSDP2."""
    priority = 'VERY_HIGH'

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        torch.manual_seed(iteration_seed(runner.seed, runner.iter, get_rank()))


class TooManyBadSamples(RuntimeError):
    """The share of bad data rows passed ``max_bad_fraction``."""


class TooManyNonFiniteSteps(RuntimeError):
    """With ``skip_nonfinite_steps=True``, the share of skipped steps passed
    ``max_nonfinite_fraction``: the artifact would be (nearly) untrained."""


@HOOKS.register_module()
class DPAHook(Hook):
    """Records a stage's losses and CMO statistics and, when training ends,
    writes its artifact and then its manifest (atomically, on rank 0).

    The CMO statistics themselves are logged every interval by mmengine's
    LoggerHook (the model returns them beside the loss); this hook keeps their
    stage-wide means for the manifest and the run summary.

    Args:
        stage: stage name (the work-dir subfolder).
        artifact: ``'adapter'`` (PEFT LoRA adapter), ``'projector'``
            (safetensors) or ``'model'`` (native format + LLaVA export).
        work_dir: the pipeline's work dir (parent of the stage's).
        made_from: what the artifact was made from (base LLM, previous
            artifacts), recorded in the manifest.
        tokenizer / image_processor: configs, for the final model's export.
        max_bad_fraction: largest tolerated share of bad rows in the dataset;
            past it the stage stops, naming the files and reasons.
        max_nonfinite_fraction: with ``skip_nonfinite_steps=True``, largest
            share of the stage's iterations whose non-finite loss may be
            skipped; past it the stage stops without writing its artifact,
            which would hand on an untrained part to the next stage.
        pad_to_square: whether the stage's images were padded to a square;
            the final model's saved image processors then pad too.
        made_by: the stage's resolved config as json text, recorded in the
            manifest (``stage_config``) for later runs to compare.

    Bad rows are replaced by the dataset and listed in the batch; this hook
    appends each (once) to ``skipped_samples.jsonl`` in the stage's work dir and
    logs the running count as ``skipped_rows``.
    """
    priority = 'NORMAL'  # before LoggerHook, so the counts it publishes are logged

    def __init__(self, stage: str, artifact: str, work_dir: str, made_from: dict,
                 tokenizer: Optional[dict] = None, image_processor: Optional[dict] = None,
                 max_bad_fraction: float = 0.01, pad_to_square: bool = False,
                 max_nonfinite_fraction: float = 0.5, made_by: Optional[str] = None):
        if artifact not in ARTIFACT_KINDS:
            raise ValueError(f'DPAHook.artifact must be one of {ARTIFACT_KINDS}, got {artifact!r}')
        self.stage, self.artifact, self.work_dir = stage, artifact, work_dir
        self.made_from = made_from
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.max_bad_fraction = max_bad_fraction
        self.max_nonfinite_fraction = max_nonfinite_fraction
        self.pad_to_square = pad_to_square
        self.made_by = None if made_by is None else json.loads(made_by)
        self.stats = dict(first_loss=None, last_loss=None, iterations=0,
                          sums={}, counts={})
        self.skipped = {}
        self.nonfinite_before_resume = 0

    def before_train(self, runner):
        self.skipped_path = osp.join(runner.work_dir, SKIPPED_FILE)
        if osp.exists(self.skipped_path):  # a resumed stage
            with open(self.skipped_path) as f:
                for line in f:
                    record = json.loads(line)
                    self.skipped[(record['file'], record['row'])] = record
        self.dataset_size = len(runner.train_dataloader.dataset)
        self._record_skipped(getattr(runner.train_dataloader.dataset, 'load_problems', []))

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        records = []
        if isinstance(data_batch, dict) and 'skipped' in data_batch:
            records = data_batch.pop('skipped')
        if get_world_size() > 1:
            # Every process learns every skipped row: one file, one count, and
            # all processes stop together at max_bad_fraction.
            records = [r for gathered in all_gather_object(records) for r in gathered]
        self._record_skipped(records)

    def _record_skipped(self, records):
        new = {}
        for record in records:  # two samples of a batch may have skipped the same row
            key = (record['file'], record['row'])
            if key not in self.skipped:
                new.setdefault(key, record)
        if not new:
            return
        self.skipped.update(new)
        if is_main_process():
            with open(self.skipped_path, 'a') as f:
                f.writelines(json.dumps(record) + '\n' for record in new.values())
        if len(self.skipped) > self.max_bad_fraction * self.dataset_size:
            reasons = Counter((r['file'], r['reason']) for r in self.skipped.values())
            listing = '; '.join(f'{file}: {count} x {reason}'
                                for (file, reason), count in reasons.most_common())
            raise TooManyBadSamples(
                f'[{self.stage}] {len(self.skipped)} bad rows out of {self.dataset_size} pass '
                f'max_bad_fraction={self.max_bad_fraction} ({listing}); every one is listed in '
                f'{self.skipped_path}. Fix the data (tools/check_data.py finds them all) or '
                'raise max_bad_fraction.')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        runner.message_hub.update_scalar('train/skipped_rows', len(self.skipped))
        skipped_steps = self.nonfinite_before_resume + getattr(runner.optim_wrapper,
                                                               'skipped_steps', 0)
        if skipped_steps:
            runner.message_hub.update_scalar('train/nonfinite_skipped', skipped_steps)
        self.stats['nonfinite_skipped'] = skipped_steps
        if skipped_steps > self.max_nonfinite_fraction * runner.max_iters:
            # Checked as it happens: the rest of the stage cannot bring the
            # share back under the limit.
            raise TooManyNonFiniteSteps(
                f'[{self.stage}] {skipped_steps} of its first {runner.iter + 1} iterations had a '
                'non-finite loss (NaN or inf) and were skipped (skip_nonfinite_steps=True): more '
                f'than max_nonfinite_fraction={self.max_nonfinite_fraction} of the stage\'s '
                f'{runner.max_iters}, so it stops without writing an artifact that would be '
                'untrained. Lower the learning rate or fix the data, then run the stage again '
                '(check the inputs with tools/check_data.py)')
        loss = float(outputs['loss'].detach())
        if self.stats['first_loss'] is None:
            self.stats['first_loss'] = loss
        self.stats['last_loss'] = loss
        self.stats['iterations'] += 1
        counts = self.stats.setdefault('counts', {})
        for key in STAT_KEYS:
            if key in outputs:
                self.stats['sums'][key] = self.stats['sums'].get(key, 0.0) + float(
                    outputs[key].detach())
                counts[key] = counts.get(key, 0) + 1

    # The statistics travel with checkpoints so a resumed stage reports the
    # whole stage, not only its tail.
    def before_save_checkpoint(self, runner, checkpoint):
        checkpoint.setdefault('meta', {})['dpa_stats'] = self.stats

    def after_load_checkpoint(self, runner, checkpoint):
        self.stats = checkpoint.get('meta', {}).get('dpa_stats', self.stats)
        self.nonfinite_before_resume = self.stats.get('nonfinite_skipped', 0)

    def stage_summary(self) -> dict:
        n = max(self.stats['iterations'], 1)
        summary = {k: self.stats[k] for k in ('iterations', 'first_loss', 'last_loss')}
        summary['skipped_rows'] = len(self.skipped)
        summary['nonfinite_skipped'] = self.stats.get('nonfinite_skipped', 0)
        counts = self.stats.get('counts', {})
        if any(self.stats['sums'].values()):
            # Checkpoints from before per-key counts hold every key once an iteration.
            summary['cmo'] = {key.replace('cmo_', ''): value / counts.get(key, n)
                              for key, value in self.stats['sums'].items()}
        return summary

    def after_train(self, runner):
        # Sharded training (FSDP2): every rank takes part in the gather, rank
        # 0's model then holds the full weights the writers below read.
        gather_full_weights(runner.model)
        if is_main_process():
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            target = osp.join(runner.work_dir, ARTIFACT_DIR)
            notes = []
            write_artifact_dir(target, lambda tmp: self._write(model, tmp, notes))
            recorded = {} if self.made_by is None else {STAGE_CONFIG_KEY: self.made_by}
            write_manifest(self.work_dir, self.stage, dict(
                artifact_kind=self.artifact, artifact=osp.abspath(target),
                made_from=self.made_from, notes=notes, **recorded, **self.stage_summary()))
            runner.logger.info(f'[{self.stage}] artifact written to {target}')
        barrier()

    def _write(self, model, out_dir, notes):
        if self.artifact == 'adapter':
            model.llm.save_pretrained(out_dir)
            sort_adapter_config(out_dir)
        elif self.artifact == 'projector':
            state = {k: v.detach().contiguous() for k, v in model.projector.state_dict().items()}
            save_file(state, osp.join(out_dir, 'projector.safetensors'))
        else:
            if has_lora(model.llm):
                # Stage 3 with LoRA: the adapter as trained, then the merged
                # model every reader of a final model loads unchanged.
                model.llm.save_pretrained(osp.join(out_dir, FINETUNE_ADAPTER_DIR))
                sort_adapter_config(osp.join(out_dir, FINETUNE_ADAPTER_DIR))
                merge_lora(model)
                notes.append(f'LoRA merged into llm/ (and hf_llava/); the adapter as trained '
                             f'is in {FINETUNE_ADAPTER_DIR}/')
            tokenizer = build_from_cfg(self.tokenizer, PROCESSORS)
            image_processor = build_from_cfg(self.image_processor, PROCESSORS)
            save_native(model, tokenizer, image_processor, out_dir, self.pad_to_square)
            try:
                export_llava(model, tokenizer, image_processor, osp.join(out_dir, 'hf_llava'),
                             self.pad_to_square)
            except ExportUnsupported as err:
                notes.append(f'no transformers LLaVA export: {err}')
