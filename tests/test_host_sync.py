"""A training step's computation (estimate, loss, backward) never reads a tensor's value on the host: no
``.item()``, ``float(t)``, ``bool(t)`` or data-dependent Python branch, which on a GPU would each stall the step
on a device-to-host copy. Checked on CPU by making those conversions raise: for every estimator's computation,
and for the whole step through Lightning with the default callbacks and a deferred non-finite guard. Operations
that sync inside C++ on a GPU (nonzero, boolean masks, copies to the host) are not seen this way; none is in a
training step (grep)."""

from __future__ import annotations

import contextlib

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from catvae.run import group_steps
from catvae.step_logging import written_this_step

from conftest import ESTIMATORS, FAST, compose_config

CONVERSIONS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@contextlib.contextmanager
def no_host_reads():
    """Tensor -> Python conversions raise inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def refuse(name):
        def conversion(self, *args, **kwargs):
            raise RuntimeError(f"host read: Tensor.{name}")
        return conversion

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_guard_catches_every_conversion():
    t = torch.ones(())
    for convert in (bool, float, int, lambda v: v.item(), lambda v: v.tolist(), lambda v: [0, 1][v.long()]):
        with no_host_reads(), pytest.raises(RuntimeError, match="host read"):
            convert(t)
    assert bool(t) and t.item() == 1.0  # restored


@pytest.mark.parametrize("name", ESTIMATORS)
def test_training_computation_of_every_estimator_reads_nothing_on_the_host(name):
    estimator = instantiate(compose_config([f"estimator={name}"]).estimator)
    cfg = compose_config(FAST + [f"estimator={name}", f"model.n_classes={2 if estimator.binary_only else 4}"])
    torch.manual_seed(0)
    model = instantiate(cfg.model, estimator=estimator, image_shape=[1, 8, 8]).train()
    x = torch.rand(16, 64).bernoulli()
    with no_host_reads():
        for _ in range(2):  # the second step sees baselines and running statistics already set
            estimate, kl, _ = model.nelbo_estimate(x)
            model.surrogate_loss(estimate, kl).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


class HostReadAudit(pl.Callback):
    """Runs every training step that writes no logs under no_host_reads, from this callback's on_train_batch_start
    (it goes first) to its on_train_batch_end: Lightning's step, the model, the estimator, the callbacks' hooks."""

    def __init__(self):
        self.active, self.audited = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not written_this_step(trainer):
            self.active = no_host_reads()
            self.active.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.active is not None:
            self.close()
            self.audited += 1

    def close(self):
        if self.active is not None:
            self.active.__exit__(None, None, None)
            self.active = None


def fit_under_audit(tmp_path, *overrides: str, steps_per_call: int = 1) -> tuple[pl.Trainer, HostReadAudit]:
    cfg = compose_config(FAST + ["trainer.log_every_n_steps=1000", "callbacks.step_checkpoint.every_n_train_steps=8",
                                 *overrides], tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model, estimator=instantiate(cfg.estimator), image_shape=list(datamodule.image_shape))
    audit = HostReadAudit()
    callbacks = [audit, *(instantiate(c) for c in cfg.callbacks.values()), instantiate(cfg.schedule)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    group_steps(trainer, model, datamodule, steps_per_call)
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        audit.close()
    return trainer, audit


@pytest.mark.parametrize("steps_per_call", [1, 4])
@pytest.mark.parametrize("estimator", ["gumbel_softmax", "reinforce"])
def test_lightning_training_steps_read_nothing_on_the_host_with_a_deferred_guard(estimator, steps_per_call, tmp_path):
    """The whole training step through Lightning, with the default callbacks and the non-finite guard reading every
    1,000 steps, converts no tensor to a Python value between logging steps (at 4 steps per call: in whole calls)."""
    trainer, audit = fit_under_audit(tmp_path, f"estimator={estimator}",
                                     "callbacks.nonfinite_guard.check_every_n_steps=1000", steps_per_call=steps_per_call)
    calls = 16 // steps_per_call
    assert trainer.global_step == 16 and audit.audited >= calls - 1  # the last call may write logs (the run stops)


def test_the_audit_catches_the_per_step_guards_read(tmp_path):
    with pytest.raises(RuntimeError, match="host read"):
        fit_under_audit(tmp_path, "estimator=gumbel_softmax", "callbacks.nonfinite_guard.check_every_n_steps=1")
