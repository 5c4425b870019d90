"""transformers' Trainer: a TrainerCallback for CLASSP and a regularizer over a task sequence.

Use one callback object for the whole sequence and a new ``Trainer`` per task (each
``trainer.train()`` is a task)::

    callback = ContinualCallback(MAS(model, lam=1.0), data=lambda task: consolidation[task])
    for task in range(tasks):
        trainer = Trainer(model, args, train_dataset=train[task], callbacks=[callback],
                          optimizer_cls_and_kwargs=(CLASSP, {"lr": 0.05, "threshold": 1e-6}))
        trainer.train()

- The regularizer is attached to each task's optimizer (``Regularizer.attach``): every
  optimizer step applies the penalty in the regularizer's ``penalty_form``, once per step with
  gradient accumulation, on the unscaled gradients under fp16 AMP, inside CLASSP's step kernel.
  Gradient clipping and the logged grad norm see the loss gradient alone.
  The callback's ``penalty="proximal"`` (or the regularizer's) applies the proximal form.
- At the end of ``train()`` the regularizer is consolidated on ``data`` (default: the
  Trainer's training DataLoader, batches as the model gets them) with the optimizer and the
  largest lr it stepped with during the task (a ``StiffnessWarning`` when the penalty is too
  stiff for it), and the optimizer's per-parameter state is kept; the next task's new
  optimizer starts from it, so CLASSP's accumulators continue.
- Every checkpoint folder gets ``continual.pt`` (regularizer, finished tasks, carried
  optimizer state, the task's largest lrs so far). ``train(resume_from_checkpoint=...)`` reloads it from
  ``output_dir/checkpoint-<step>``; for a checkpoint elsewhere call ``load(folder)`` first.
"""
from __future__ import annotations

import os

from transformers import TrainerCallback

from ..checkpoint import load_checkpoint, save_checkpoint
from .continual import ContinualRun

STATE_FILE = "continual.pt"
# transformers' checkpoint folder name: f"{PREFIX_CHECKPOINT_DIR}-{global_step}"
CHECKPOINT_PREFIX = "checkpoint"


class ContinualCallback(TrainerCallback):
    """Penalty, consolidation, carried optimizer state and checkpoints for a Trainer per task.

    Arguments as :class:`classp_fused.integrations.continual.ContinualRun`: ``regularizer``,
    ``data`` (batches or ``data(task_index)``; default the Trainer's training data),
    ``forward``, ``labels`` (for ``consolidate``), ``carry_optimizer_state``, ``penalty``
    (``"explicit"`` or ``"proximal"``; None: the regularizer's ``penalty_form``).
    """

    def __init__(self, regularizer=None, data=None, forward=None, labels=None,
                 carry_optimizer_state: bool = True, penalty=None):
        self.run = ContinualRun(regularizer, data, forward, labels, carry_optimizer_state,
                                penalty)
        self._loaded = False

    def load(self, checkpoint_folder: str) -> None:
        """Restore the state saved in ``checkpoint_folder`` (before ``train(resume_from_...)``)."""
        self.run.load_state_dict(load_checkpoint(os.path.join(checkpoint_folder, STATE_FILE)))
        self._loaded = True

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step > 0 and not self._loaded:
            folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
            if not os.path.isfile(os.path.join(folder, STATE_FILE)):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {folder} holds no {STATE_FILE}: "
                    "call ContinualCallback.load(checkpoint_folder) before train()")
            self.load(folder)
        self._loaded = False
        self.run.begin_task(optimizer)

    def on_train_end(self, args, state, control, optimizer=None, train_dataloader=None,
                     **kwargs):
        self.run.end_task(optimizer, train_dataloader)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
            save_checkpoint(self.run.state_dict(), os.path.join(folder, STATE_FILE))

