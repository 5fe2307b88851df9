"""The estimator contract shared by every gradient estimator (see ../shared/design.md).

An estimator receives the logits (B, N, K) of N independent categorical variables with K classes and
an objective f mapping samples z (..., B, N, K) to per-example losses (..., B). It returns an
:class:`Estimate` whose ``surrogate`` has, as its gradient, the estimator's estimate of
d E_{q(z)}[f(z)] / d params (for relaxed estimators: of the relaxed objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from catvae.relaxations import check_temperature

Objective = Callable[[Tensor], Tensor]


@dataclass
class Estimate:
    """What an estimator returns.

    loss:      (B,) objective value at the sample(s) drawn; what is reported.
    surrogate: (B,) differentiable; d surrogate.sum() / d params is the gradient estimate (plus, for
               estimators with parameters of their own, their training loss, which reaches only them).
    z:         the sample(s) used, one-hot or relaxed, shape (..., B, N, K).
    encoder_scale: see below.
    """

    loss: Tensor
    surrogate: Tensor
    z: Tensor
    #: s >= 1 by which a variance-normalising estimator divided its gradient for the logits (a constant of
    #: the step). The model divides the closed-form part of the encoder's objective (the analytic KL) by the
    #: same s, so the encoder's whole gradient is rescaled, never turned; 1 for other estimators.
    encoder_scale: Tensor | float = 1.0


def masked_as_zero(logits: Tensor) -> Tensor:
    """``logits`` with masked classes (-inf, or any non-finite value) at 0, for a surrogate sg(g) . logits whose g
    is 0 there: no 0 * inf = NaN."""
    return torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))


class Estimator(nn.Module):
    """Base class: ``forward(logits, objective, context=None) -> Estimate``.

    ``context`` (e.g. the encoder's features, (B, H)) is for input-dependent baselines; estimators
    that need none ignore it. State (baselines, temperatures) lives in buffers/parameters so that
    checkpoints restore it. ``name`` is the stable identifier used in logs and configs.
    ``optim`` holds optimiser options (e.g. ``{"lr": 1e-2}``) for the estimator's own parameters,
    which the model puts in a parameter group of their own.
    """

    name: str = "estimator"
    #: True where the gradient is an unbiased estimate of d E_q[f(z)] / d params.
    unbiased: ClassVar[bool] = False
    #: True where only Bernoulli latents (K = 2) are supported.
    binary_only: ClassVar[bool] = False
    #: False where the estimator optimises a sampled bound and wants the whole per-sample
    #: -log p(x, z) + log q(z|x) as its objective (VIMCO) instead of -log p(x|z) plus a closed-form KL.
    analytic_kl: ClassVar[bool] = True
    #: True where training differentiates through the objective twice (a variance gradient of a
    #: learned control variate): torch.compile'd networks do not support that double backward.
    double_backward: ClassVar[bool] = False

    def __init__(self, name: str | None = None, optim: dict | None = None):
        """``name`` overrides the class's default name, e.g. to tell two configurations apart in logs."""
        super().__init__()
        if name is not None:
            self.name = name
        self.optim = dict(optim or {})

    def bind(self, n_vars: int, n_classes: int, context_dim: int) -> None:
        """Called once by the model at construction, before training: estimators check the latent
        sizes they support and build their networks here."""
        self.n_vars, self.n_classes = n_vars, n_classes
        if self.binary_only and n_classes != 2:
            raise ValueError(f"estimator {self.name} supports Bernoulli latents only (model.n_classes=2), "
                             f"got model.n_classes={n_classes}")

    def evaluations(self) -> int:
        """Objective evaluations per example and step: the configurations z passed to the objective (extra backward
        passes, as DARN's and MuProp's slopes, are not counted). The cost in the equal-work comparison
        ``grad/<name>/var_x_evals``. Sizes from :meth:`bind`."""
        return 1

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        raise NotImplementedError

    def check_logits(self, logits: Tensor) -> None:
        """Raise unless logits have the (B, N, K) layout with K >= 2 (K = 2 for binary-only estimators)."""
        if logits.dim() != 3 or logits.shape[-1] < 2 or (self.binary_only and logits.shape[-1] != 2):
            allowed = "K = 2" if self.binary_only else "K >= 2"
            raise ValueError(f"logits must have shape (B, N, K) with {allowed}, got {tuple(logits.shape)}")


class TemperatureEstimator(Estimator):
    """An estimator with a temperature ``tau`` (a positive finite number) that schedules set."""

    def __init__(self, tau: float = 1.0, name: str | None = None, optim: dict | None = None):
        super().__init__(name, optim)
        self.tau = tau

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        check_temperature(value, "estimator.tau")
        self._tau = float(value)

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}"
