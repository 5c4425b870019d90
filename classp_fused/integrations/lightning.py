"""Lightning's Trainer: a Callback for CLASSP and a regularizer over a task sequence.

Use one callback object for the whole sequence and a new ``Trainer`` per task (each
``trainer.fit()`` is a task); ``configure_optimizers`` may build a new optimizer each time::

    callback = ContinualCallback(EWC(module.net, lam=100.0), data=lambda task: consolidation[task])
    for task in range(tasks):
        Trainer(max_epochs=2, callbacks=[callback]).fit(module, train[task])

- The regularizer is attached to the task's optimizer (``Regularizer.attach``): every
  optimizer step applies the penalty in the regularizer's ``penalty_form``, once per step
  (after gradient accumulation), on the unscaled gradients under a 16-mixed GradScaler, inside
  CLASSP's step kernel; gradient clipping sees the loss gradient alone.
  The callback's ``penalty="proximal"`` (or the regularizer's) applies the proximal form.
- At the end of ``fit()`` the regularizer is consolidated on ``data`` (default: the training
  DataLoader) with the optimizer and the largest lr it stepped with during the task (a
  ``StiffnessWarning`` when the penalty is too stiff for it), and the optimizer's
  per-parameter state is kept; the next task's new optimizer starts from it, so CLASSP's
  accumulators continue.
- The callback's state (regularizer, finished tasks, carried optimizer state, the task's
  largest lrs so far) is part of every Lightning checkpoint, so ``fit(ckpt_path=...)``
  restores it.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from .continual import ContinualRun


class ContinualCallback(Callback):
    """Penalty, consolidation, carried optimizer state and checkpoints for a Trainer per task.

    Arguments as :class:`classp_fused.integrations.continual.ContinualRun`: ``regularizer``,
    ``data`` (batches or ``data(task_index)``; default the training DataLoader), ``forward``,
    ``labels`` (for ``consolidate``), ``carry_optimizer_state``, ``penalty`` (``"explicit"``
    or ``"proximal"``; None: the regularizer's ``penalty_form``). The module configures one
    optimizer (automatic or manual optimization).
    """

    def __init__(self, regularizer=None, data=None, forward=None, labels=None,
                 carry_optimizer_state: bool = True, penalty=None):
        self.run = ContinualRun(regularizer, data, forward, labels, carry_optimizer_state,
                                penalty)

    def on_train_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise ValueError("ContinualCallback supports one optimizer, "
                             f"the module configured {len(trainer.optimizers)}")
        self.run.begin_task(trainer.optimizers[0])

    def on_train_end(self, trainer, pl_module):
        self.run.end_task(trainer.optimizers[0], trainer.train_dataloader)

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run.load_state_dict(state_dict)
