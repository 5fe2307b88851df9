"""Score-function (REINFORCE) estimators."""

from __future__ import annotations

from torch import Tensor

from catvae.estimators.base import Estimate, Estimator, Objective
from catvae.estimators.baselines import Baseline, MovingAverageBaseline
from catvae.relaxations import categorical_log_prob, sample_categorical


def score_function_surrogate(loss: Tensor, log_q: Tensor, advantage: Tensor) -> Tensor:
    """Surrogate whose gradient is grad f(z) + (f(z) - b) grad log q(z) (Williams 1992).

    ``loss`` carries the pathwise part (objective parameters, e.g. the decoder), ``advantage``
    (f - b) is detached so only log q(z) carries the score term to the encoder.
    """
    return loss + advantage.detach() * log_q


class Reinforce(Estimator):
    """REINFORCE with a baseline: z ~ q hard one-hot, grad = (f(z) - b) grad log q(z) + grad f(z).

    Unbiased for any baseline b that does not depend on z. The default is a bias-corrected moving
    average of f (see :class:`~catvae.estimators.baselines.MovingAverageBaseline`).
    """

    name = "reinforce"
    unbiased = True

    def __init__(self, baseline: Baseline | None = None, name: str | None = None):
        super().__init__(name)
        self.baseline = baseline if baseline is not None else MovingAverageBaseline()

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        z = sample_categorical(logits)  # (B, N, K), no gradient
        loss = objective(z)  # (B,)
        log_q = categorical_log_prob(logits, z)  # (B,)
        advantage = loss.detach() - self.baseline(loss.detach(), context)  # (B,)
        if self.training:
            self.baseline.update(loss.detach())
        return Estimate(loss=loss, surrogate=score_function_surrogate(loss, log_q, advantage), z=z)
