"""Baselines b for score-function estimators: grad = (f(z) - b) * grad log q(z) (+ grad f(z)).

A baseline must not depend on the sample z it is applied to, or the estimator becomes biased;
the moving average therefore returns its value from *before* it sees the current batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Baseline(nn.Module):
    """Interface: ``forward(signal (B,), context) -> b (B,)``, then ``update(signal)`` after use."""

    def forward(self, signal: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def update(self, signal: Tensor) -> None:
        """Observe the current learning signal (detached); default: stateless."""


class NoBaseline(Baseline):
    """b = 0: plain REINFORCE (Williams 1992)."""

    def forward(self, signal: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.zeros_like(signal)


class MovingAverageBaseline(Baseline):
    """Bias-corrected exponential moving average of the batch-mean learning signal.

    m_t = d m_{t-1} + (1 - d) mean_B(f_t),  w_t = d w_{t-1} + (1 - d),  b_t = m_{t-1} / w_{t-1}
    (b = 0 before the first update). The correction by w removes the pull towards the initial 0,
    as in Adam's moment estimates. Both are buffers, so checkpoints restore the baseline, and the
    update is pure tensor arithmetic (no host sync).
    """

    def __init__(self, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"baseline decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("weight", torch.zeros(()))

    def forward(self, signal: Tensor, context: Tensor | None = None) -> Tensor:
        value = self.mean / self.weight.clamp_min(torch.finfo(self.weight.dtype).tiny)
        return value.expand_as(signal)

    @torch.no_grad()
    def update(self, signal: Tensor) -> None:
        self.mean.mul_(self.decay).add_((1.0 - self.decay) * signal.detach().float().mean())
        self.weight.mul_(self.decay).add_(1.0 - self.decay)
