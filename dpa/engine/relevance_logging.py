"""The CMO/CAL weight histogram in TensorBoard, when the run's visualizer has
a ``TensorboardVisBackend`` (see ``configs/_base_/default_runtime.py``)."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.visualization import TensorboardVisBackend

from dpa.registry import HOOKS


@HOOKS.register_module()
class RelevanceHistogramHook(Hook):
    """Every ``interval`` iterations, the histogram of the last batch's token
    weights (``<stage>/cmo_weight``). Does nothing without a TensorBoard
    backend or for a vanilla loss.

    Args:
        stage: the stage's name, the tag's prefix.
        interval: iterations between histograms; default: the logger's.
    """
    priority = 'LOW'

    def __init__(self, stage: str, interval: Optional[int] = None):
        self.stage, self.interval = stage, interval
        self.writer = None

    def before_train(self, runner):
        backends = getattr(runner.visualizer, '_vis_backends', {}).values()
        tensorboard = [b for b in backends if isinstance(b, TensorboardVisBackend)]
        self.writer = tensorboard[0].experiment if tensorboard else None
        if self.interval is None:
            logger = runner.hooks and next((h for h in runner.hooks
                                            if type(h).__name__ == 'LoggerHook'), None)
            self.interval = getattr(logger, 'interval', 10)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.writer is None or not self.every_n_train_iters(runner, self.interval):
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        weights = getattr(getattr(model, 'loss_fn', None), 'last_weights', None)
        if weights is not None and weights.numel():
            self.writer.add_histogram(f'{self.stage}/cmo_weight', weights.float().cpu(),
                                      runner.iter + 1)
