"""Several optimiser steps per framework call (``steps_per_call=k``): which consecutive batches one call trains on.

Lightning's per-batch machinery (its loop and fetcher, progress tracking, the callback and logger dispatch, the
optimiser closure) costs a fixed amount of host time per call of ``training_step``. With ``steps_per_call=k > 1`` the
training loader yields groups of up to k consecutive batches (:class:`GroupedLoader`) and one call trains on all of
them, one optimiser step per batch (:class:`catvae.models.stepped.SteppedModule`), so that cost is paid once per call.

The math is that of k = 1, step for step: the same batches in the same order, the same random streams, and a call
never spans a step at which anything but the step itself happens. A call ends at the end of its epoch, at
``max_steps``, and at every multiple of each *step period* (:func:`step_periods`: the logging interval, the rolling
checkpoint's, the temperature schedule's, the gradient diagnostics', the deferred guard's reads), so whatever acts in
Lightning's per-batch hooks acts at the same global steps, on the same state, for every k. The per-step hooks
(``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``: the non-finite guard) run at every step.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from catvae.validation import check_integer


def step_periods(trainer: pl.Trainer) -> dict[str, int]:
    """{what: period} of everything that acts at multiples of a number of global steps: the loggers
    (``trainer.log_every_n_steps``), every ModelCheckpoint with ``every_n_train_steps``, and every callback that
    declares a ``step_period`` (temperature schedules, gradient diagnostics, the deferred guard; None: acts at no
    particular step)."""
    periods = {"trainer.log_every_n_steps": trainer.log_every_n_steps}
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if isinstance(callback, ModelCheckpoint) and callback._every_n_train_steps > 0:
            periods[f"{name}.every_n_train_steps"] = callback._every_n_train_steps
        elif getattr(callback, "step_period", None):
            periods[f"{name}.step_period"] = callback.step_period
    return periods


class StepGrouping:
    """How many steps each call runs: as many as ``steps_per_call``, but never past the end of an epoch, past
    ``max_steps`` (-1: no limit) or past a multiple of any of ``periods``."""

    def __init__(self, steps_per_call: int, periods: dict[str, int], max_steps: int = -1):
        self.steps_per_call = check_integer("steps_per_call", steps_per_call)
        self.periods, self.max_steps = dict(periods), max_steps

    def length(self, step: int, left: int, stop_at_max_steps: bool = True) -> int:
        """Steps of the call that starts at global step ``step`` with ``left`` batches left in its epoch."""
        length = min(self.steps_per_call, left, *(period - step % period for period in self.periods.values()))
        if stop_at_max_steps and self.max_steps > step:
            return min(length, self.max_steps - step)
        return length

    def calls(self, first_step: int, n_batches: int) -> list[int]:
        """The lengths of the calls of a whole epoch of ``n_batches`` that starts at global step ``first_step``
        (``max_steps`` aside)."""
        lengths, position = [], 0
        while position < n_batches:
            lengths.append(self.length(first_step + position, n_batches - position, stop_at_max_steps=False))
            position += lengths[-1]
        return lengths

    def check(self, n_batches: int) -> None:
        """Refuses what grouping cannot keep exact: Lightning counts calls, not steps, to find an epoch's end and
        its validation, so every epoch must be cut into the same calls (each period a divisor or a multiple of the
        epoch's ``n_batches``), and ``max_steps`` must not fall inside the last call of an epoch (Lightning would
        take that call for the epoch's end)."""
        for key, period in self.periods.items():
            if n_batches % period and period % n_batches:
                raise ValueError(
                    f"steps_per_call={self.steps_per_call} needs every step period to divide the epoch's {n_batches} "
                    f"steps or be a multiple of them; {key}={period} is neither (choose e.g. "
                    f"{max(d for d in range(1, n_batches + 1) if n_batches % d == 0 and d <= period)} or "
                    f"{n_batches * -(-period // n_batches)}, or steps_per_call=1)")
        if self.max_steps > 0 and self.max_steps % n_batches:
            epoch_start = self.max_steps - self.max_steps % n_batches
            last = self.calls(epoch_start, n_batches)[-1]
            if self.max_steps > epoch_start + n_batches - last:
                raise ValueError(
                    f"steps_per_call={self.steps_per_call}: trainer.max_steps={self.max_steps} falls inside the last "
                    f"call of its epoch (steps {epoch_start + n_batches - last}..{epoch_start + n_batches}), which "
                    f"Lightning would take for the epoch's end; choose another max_steps or steps_per_call=1")


def saved_position(resume_at: tuple[int, int] | None, epoch: int) -> int:
    """Where an epoch's iteration starts: at the position saved by a checkpoint (``resume_at`` = (epoch, batches
    trained on)) if it was saved in this ``epoch``, else at 0 (after an epoch-end save the next epoch starts)."""
    return resume_at[1] if resume_at and resume_at[0] == epoch else 0


class GroupedLoader:
    """Iterable of lists of consecutive batches of ``batches`` (a resumable loader such as
    :class:`catvae.data.TensorBatchLoader`), cut by ``grouping``; one list per call. The global step at a batch is
    ``epoch * len(batches) + position``: every batch of an epoch is one step. Resumable at every call's end (where
    checkpoints are written): the position is saved beside the wrapped loader's own state."""

    batch_sampler = None  # Lightning looks for ``set_epoch`` on ``sampler``

    def __init__(self, batches, grouping: StepGrouping):
        self.batches, self.grouping = batches, grouping
        self.sampler = batches.sampler
        self.position = 0  # batches of this epoch yielded so far
        self.resume_at: tuple[int, int] | None = None  # (epoch, position) from a checkpoint

    def __len__(self) -> int:
        return len(self.grouping.calls(0, len(self.batches)))

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "epoch": self.sampler.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.resume_at = (state["epoch"], state["position"])

    def __iter__(self):
        n_batches, epoch = len(self.batches), self.sampler.epoch
        self.position = saved_position(self.resume_at, epoch)
        self.resume_at = None
        batches = iter(self.batches)
        while self.position < n_batches:
            length = self.grouping.length(epoch * n_batches + self.position, n_batches - self.position)
            group = [next(batches) for _ in range(length)]
            self.position += length
            yield group


def check_trainer(trainer: pl.Trainer, steps_per_call: int) -> None:
    """Refuses, before training, the trainer options that count calls instead of steps or that need Lightning's
    own optimiser step (its GradScaler, clipping, accumulation)."""
    refused = {
        "trainer.precision": (trainer.precision, getattr(trainer.precision_plugin, "scaler", None) is not None,
                              "its GradScaler steps the optimiser itself; use 32-true or bf16-mixed"),
        "trainer.gradient_clip_val": (trainer.gradient_clip_val, bool(trainer.gradient_clip_val), "unset it"),
        "trainer.accumulate_grad_batches": (trainer.accumulate_grad_batches, trainer.accumulate_grad_batches != 1,
                                            "use 1"),
        "trainer.val_check_interval": (trainer.val_check_interval, trainer.val_check_interval not in (None, 1.0),
                                       "it counts calls; use check_val_every_n_epoch"),
        "trainer.limit_train_batches": (trainer.limit_train_batches, trainer.limit_train_batches != 1.0,
                                        "it counts calls; use 1.0"),
    }
    for key, (value, bad, advice) in refused.items():
        if bad:
            raise ValueError(f"steps_per_call={steps_per_call} cannot be combined with {key}={value!r}: {advice} "
                             f"(or set steps_per_call=1)")
