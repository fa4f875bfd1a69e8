"""DPAHook: the stage's hand-off to the next one, and its training statistics."""
import os.path as osp
from typing import Optional

import torch
from mmengine.dist import barrier, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import build_from_cfg
from safetensors.torch import save_file

from dpa.engine.artifacts import ARTIFACT_DIR, write_artifact_dir, write_manifest
from dpa.models.builders import PROCESSORS
from dpa.models.export import ExportUnsupported, export_llava, save_native
from dpa.registry import HOOKS

STAT_KEYS = ('cmo_w_mean', 'cmo_at_min', 'cmo_at_max', 'cmo_delta_mean')
ARTIFACT_KINDS = ('adapter', 'projector', 'model')


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
    """
    priority = 'LOW'

    def __init__(self, stage: str, artifact: str, work_dir: str, made_from: dict,
                 tokenizer: Optional[dict] = None, image_processor: Optional[dict] = None):
        if artifact not in ARTIFACT_KINDS:
            raise ValueError(f'DPAHook.artifact must be one of {ARTIFACT_KINDS}, got {artifact!r}')
        self.stage, self.artifact, self.work_dir = stage, artifact, work_dir
        self.made_from = made_from
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.stats = dict(first_loss=None, last_loss=None, iterations=0,
                          sums={key: 0.0 for key in STAT_KEYS})

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        loss = float(outputs['loss'].detach())
        if self.stats['first_loss'] is None:
            self.stats['first_loss'] = loss
        self.stats['last_loss'] = loss
        self.stats['iterations'] += 1
        for key in STAT_KEYS:
            if key in outputs:
                self.stats['sums'][key] += float(outputs[key].detach())

    # The statistics travel with checkpoints so a resumed stage reports the
    # whole stage, not only its tail.
    def before_save_checkpoint(self, runner, checkpoint):
        checkpoint.setdefault('meta', {})['dpa_stats'] = self.stats

    def after_load_checkpoint(self, runner, checkpoint):
        self.stats = checkpoint.get('meta', {}).get('dpa_stats', self.stats)

    def stage_summary(self) -> dict:
        n = max(self.stats['iterations'], 1)
        summary = {k: self.stats[k] for k in ('iterations', 'first_loss', 'last_loss')}
        if any(self.stats['sums'].values()):
            summary['cmo'] = {key.replace('cmo_', ''): value / n
                              for key, value in self.stats['sums'].items()}
        return summary

    def after_train(self, runner):
        if is_main_process():
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            target = osp.join(runner.work_dir, ARTIFACT_DIR)
            notes = []
            write_artifact_dir(target, lambda tmp: self._write(model, tmp, notes))
            write_manifest(self.work_dir, self.stage, dict(
                artifact_kind=self.artifact, artifact=osp.abspath(target),
                made_from=self.made_from, notes=notes, **self.stage_summary()))
            runner.logger.info(f'[{self.stage}] artifact written to {target}')
        barrier()

    def _write(self, model, out_dir, notes):
        if self.artifact == 'adapter':
            model.llm.save_pretrained(out_dir)
        elif self.artifact == 'projector':
            state = {k: v.detach().contiguous() for k, v in model.projector.state_dict().items()}
            save_file(state, osp.join(out_dir, 'projector.safetensors'))
        else:
            tokenizer = build_from_cfg(self.tokenizer, PROCESSORS)
            image_processor = build_from_cfg(self.image_processor, PROCESSORS)
            save_native(model, tokenizer, image_processor, out_dir)
            try:
                export_llava(model, tokenizer, image_processor, osp.join(out_dir, 'hf_llava'))
            except ExportUnsupported as err:
                notes.append(f'no transformers LLaVA export: {err}')
