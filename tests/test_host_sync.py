"""A training step's computation (estimate, loss, backward) never reads a tensor's value on the host: no
``.item()``, ``float(t)``, ``bool(t)`` or data-dependent Python branch, which on a GPU would each stall the step
on a device-to-host copy. Checked on CPU by making those conversions raise."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hydra.utils import instantiate

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
