"""The estimator contract shared by every gradient estimator (see ../shared/design.md).

An estimator receives the logits (B, N, K) of N independent categorical variables with K classes and
an objective f mapping samples z (..., B, N, K) to per-example losses (..., B). It returns an
:class:`Estimate` whose ``surrogate`` has, as its gradient, the estimator's estimate of
d E_{q(z)}[f(z)] / d params (for relaxed estimators: of the relaxed objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import Tensor, nn

Objective = Callable[[Tensor], Tensor]


@dataclass
class Estimate:
    """What an estimator returns.

    loss:      (B,) objective value at the sample(s) drawn; what is reported.
    surrogate: (B,) differentiable; d surrogate.sum() / d params is the gradient estimate.
    z:         the sample(s) used, one-hot or relaxed, shape (..., B, N, K).
    """

    loss: Tensor
    surrogate: Tensor
    z: Tensor


class Estimator(nn.Module):
    """Base class: ``forward(logits, objective, context=None) -> Estimate``.

    ``context`` (e.g. the encoder's features, (B, H)) is for input-dependent baselines; estimators
    that need none ignore it. State (baselines, temperatures) lives in buffers/parameters so that
    checkpoints restore it. ``name`` is the stable identifier used in logs and configs.
    """

    name: str = "estimator"
    #: True where the gradient is an unbiased estimate of d E_q[f(z)] / d params.
    unbiased: ClassVar[bool] = False

    def __init__(self, name: str | None = None):
        """``name`` overrides the class's default name, e.g. to tell two configurations apart in logs."""
        super().__init__()
        if name is not None:
            self.name = name

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        raise NotImplementedError

    @staticmethod
    def check_logits(logits: Tensor) -> None:
        """Raise unless logits have the (B, N, K) layout with K >= 2."""
        if logits.dim() != 3 or logits.shape[-1] < 2:
            raise ValueError(f"logits must have shape (B, N, K) with K >= 2, got {tuple(logits.shape)}")
