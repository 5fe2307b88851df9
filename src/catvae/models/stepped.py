"""The training step shared by the models: one optimiser step per Lightning call (Lightning's automatic optimisation),
or several (``steps_per_call=k``, :mod:`catvae.step_calls`)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor

# Per-step callback hooks, called at every step of a call in the order Lightning's automatic optimisation calls them
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


class SteppedModule(pl.LightningModule):
    """A LightningModule whose models define :meth:`training_loss` (the loss of one batch, logging its per-step metrics
    when ``written_this_step``) instead of ``training_step``.

    With :meth:`run_steps_per_call` (k > 1) each call receives a list of consecutive batches and runs, per batch, what
    Lightning's automatic optimisation runs per call: the forward pass, ``zero_grad``, ``on_before_backward``, the
    backward pass, ``on_after_backward``, ``on_before_optimizer_step``, the optimiser step (with autocast off for the
    backward pass and the step, as there), and counts the step. The logging counter follows the step, so that a
    metric logged at a call's last step is logged at that step.
    """

    def training_loss(self, batch) -> Tensor:
        raise NotImplementedError

    def run_steps_per_call(self, steps_per_call: int) -> None:
        """k > 1: manual optimisation, lists of batches (:class:`catvae.step_calls.GroupedLoader`)."""
        self.automatic_optimization = steps_per_call == 1

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            return self.training_loss(batch)
        self.train_on(batch)
        return None

    def on_train_start(self) -> None:
        callbacks = self.trainer.callbacks
        self.step_hooks = {name: [getattr(c, name) for c in callbacks
                                  if getattr(type(c), name) is not getattr(pl.Callback, name)] for name in STEP_HOOKS}

    def train_on(self, batches: list) -> None:
        """One optimiser step per batch of ``batches``, in order."""
        trainer = self.trainer
        optimizer = self.optimizers(use_pl_optimizer=False)
        epoch_loop = trainer.fit_loop.epoch_loop
        progress = epoch_loop.manual_optimization.optim_step_progress
        before_backward, after_backward, before_step = (self.step_hooks[name] for name in STEP_HOOKS)
        for batch in batches:
            epoch_loop._batches_that_stepped = trainer.global_step  # the step that written_this_step() asks about
            loss = self.training_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=False):
                for hook in before_backward:
                    hook(trainer, self, loss)
                loss.backward()
                for hook in after_backward:
                    hook(trainer, self)
                for hook in before_step:
                    hook(trainer, self, optimizer)
                optimizer.step()
            progress.increment_ready()
            progress.increment_completed()
        epoch_loop._batches_that_stepped = trainer.global_step - 1  # Lightning counts the call as one more
