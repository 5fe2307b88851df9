"""The exact gradient by enumeration: ground truth for tests and diagnostics."""

from __future__ import annotations

from torch import Tensor

from catvae.estimators.base import Estimate, Estimator, Objective
from catvae.relaxations import categorical_log_prob, enumerate_one_hot
from catvae.validation import check_integer


class Exact(Estimator):
    """E_q[f(z)] = sum_z q(z) f(z) over all K^N configurations, differentiated exactly:

        d/d theta E_q[f] = sum_z [ f(z) d q(z)/d theta + q(z) d f(z)/d theta ].

    Refuses (before training, at ``bind``) latent spaces with more than ``max_configurations``
    configurations; the objective is evaluated on all of them at once, (K^N, B, N, K).
    """

    name = "exact"
    unbiased = True

    def __init__(self, max_configurations: int = 4096, name: str | None = None, optim: dict | None = None):
        super().__init__(name, optim)
        self.max_configurations = check_integer("estimator.max_configurations", max_configurations)

    def check_size(self, n_vars: int, n_classes: int) -> None:
        if n_classes ** n_vars > self.max_configurations:
            raise ValueError(
                f"estimator exact enumerates K^N = {n_classes}^{n_vars} = {n_classes ** n_vars} configurations, "
                f"more than estimator.max_configurations={self.max_configurations}; use a smaller latent space "
                f"or raise the limit")

    def bind(self, n_vars: int, n_classes: int, context_dim: int) -> None:
        super().bind(n_vars, n_classes, context_dim)
        self.check_size(n_vars, n_classes)

    def evaluations(self) -> int:
        return self.n_classes ** self.n_vars

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        batch, n_vars, n_classes = logits.shape
        self.check_size(n_vars, n_classes)
        configs = enumerate_one_hot(n_vars, n_classes, logits.device).to(logits.dtype)  # (C, N, K)
        z = configs[:, None].expand(-1, batch, -1, -1)  # (C, B, N, K)
        q = categorical_log_prob(logits, z).exp()  # (C, B)
        expected = (q * objective(z)).sum(0)  # (B,)
        return Estimate(loss=expected, surrogate=expected, z=z)
