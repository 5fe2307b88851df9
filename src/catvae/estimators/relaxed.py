"""Relaxed (reparameterised) estimators: Gumbel-Softmax and Straight-Through Gumbel-Softmax."""

from __future__ import annotations

from torch import Tensor

from catvae.estimators.base import Estimate, Estimator, Objective
from catvae.relaxations import check_temperature, gumbel_softmax


class GumbelSoftmax(Estimator):
    """Gumbel-Softmax (Jang et al. 2017, Eq. 2; Maddison et al. 2017): z = softmax((logits + g) / tau).

    The gradient d f(z) / d logits of the relaxed sample is biased for E_q[f] at tau > 0 and
    its variance grows as tau -> 0. ``tau`` is set by a temperature schedule callback.
    """

    name = "gumbel_softmax"
    hard = False

    def __init__(self, tau: float = 1.0, name: str | None = None):
        super().__init__(name)
        self.tau = tau

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        check_temperature(value, "estimator.tau")
        self._tau = float(value)

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        z = gumbel_softmax(logits, self.tau, hard=self.hard)  # (B, N, K)
        loss = objective(z)  # (B,)
        return Estimate(loss=loss, surrogate=loss, z=z)

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}"


class STGumbelSoftmax(GumbelSoftmax):
    """Straight-Through Gumbel-Softmax (Jang et al. 2017, Section 2.2): the forward pass uses the
    one-hot z = one_hot(argmax(logits + g)), the backward pass the gradient of the soft sample
    softmax((logits + g) / tau).
    """

    name = "st_gumbel_softmax"
    hard = True
