"""Baselines for score-function estimators: the score term uses the advantage A = (f(z) - b) / s.

A baseline b must not depend on the sample z it is applied to, or the estimator becomes biased;
running statistics therefore return their values from *before* they see the current batch. A scale
s (NVIL's variance normalisation, Mnih & Gregor 2014, Section 3.3) that does not depend on z rescales
the score term by a positive constant: the direction stays unbiased, the step size is normalised.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from catvae.models.networks import mlp
from catvae.validation import check_integer


class Baseline(nn.Module):
    """Interface: ``advantage(signal (B,), context) -> A (B,)``; ``update(signal, context)`` after use;
    ``loss(signal, context) -> (B,)`` for baselines with parameters (minimised with the model)."""

    def bind(self, context_dim: int) -> None:
        """Called once with the size of the context features (learned baselines build networks here)."""

    def advantage(self, signal: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def update(self, signal: Tensor, context: Tensor | None = None) -> None:
        """Observe the current learning signal; default: stateless."""

    def loss(self, signal: Tensor, context: Tensor | None = None) -> Tensor:
        """Training loss of the baseline's own parameters, (B,); default: none."""
        return torch.zeros_like(signal)

    def scale(self) -> Tensor | float:
        """The positive constant s the advantage is divided by (1 without variance normalisation)."""
        return 1.0


class NoBaseline(Baseline):
    """A = f: plain REINFORCE (Williams 1992)."""

    def advantage(self, signal: Tensor, context: Tensor | None = None) -> Tensor:
        return signal


class MovingAverageBaseline(Baseline):
    """Bias-corrected exponential moving averages of the batch mean and variance of the signal:

        m_t = d m_{t-1} + (1 - d) mean_B(r_t),   v_t = d v_{t-1} + (1 - d) var_B(r_t),   w_t = d w_{t-1} + (1 - d),
        A = (r - m/w) / max(1, sqrt(v/w))   with ``normalise_variance``, else A = r - m/w,

    where r = f for this class (r = f - b(x) in :class:`LearnedBaseline`), using m, v, w from before
    the current batch (all 0 before the first update: A = r). Buffers, so checkpoints restore them;
    pure tensor arithmetic, so no host sync.
    """

    def __init__(self, decay: float = 0.99, normalise_variance: bool = False):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"baseline decay must be in [0, 1), got {decay!r}")
        self.decay, self.normalise_variance = decay, normalise_variance
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.zeros(()))
        self.register_buffer("weight", torch.zeros(()))

    def residual(self, signal: Tensor, context: Tensor | None) -> Tensor:
        """The quantity whose statistics are tracked: r = f here."""
        return signal

    def scale(self) -> Tensor:
        """s = max(1, sqrt(v/w)) with variance normalisation, else 1 (a 0-dim tensor)."""
        if not self.normalise_variance:
            return torch.ones((), device=self.var.device)
        return (self.var / self.weight.clamp_min(torch.finfo(self.weight.dtype).tiny)).sqrt().clamp_min(1.0)

    def centre_and_scale(self, residual: Tensor) -> Tensor:
        centred = residual - self.mean / self.weight.clamp_min(torch.finfo(self.weight.dtype).tiny)
        return centred / self.scale() if self.normalise_variance else centred

    def advantage(self, signal: Tensor, context: Tensor | None = None) -> Tensor:
        return self.centre_and_scale(self.residual(signal, context))

    @torch.no_grad()
    def update(self, signal: Tensor, context: Tensor | None = None) -> None:
        residual = self.residual(signal, context).detach().float()
        decay = self.decay
        self.mean.mul_(decay).add_((1.0 - decay) * residual.mean())
        self.var.mul_(decay).add_((1.0 - decay) * residual.var(unbiased=False))
        self.weight.mul_(decay).add_(1.0 - decay)


class LearnedBaseline(MovingAverageBaseline):
    """NVIL's input-dependent baseline (Mnih & Gregor 2014): b(x) = MLP(context) with one hidden
    layer, on top of the moving-average centring (and optional variance normalisation) of
    r = f - b(x). b is trained to minimise (f - m/w - b(x))^2; the context is detached, so this loss
    reaches only b's own parameters.
    """

    def __init__(self, hidden_size: int = 100, decay: float = 0.99, normalise_variance: bool = True):
        super().__init__(decay, normalise_variance)
        self.hidden_size = check_integer("baseline hidden_size", hidden_size)
        self.network: nn.Module | None = None

    def bind(self, context_dim: int) -> None:
        self.network = mlp([context_dim, self.hidden_size, 1])

    def predict(self, context: Tensor | None) -> Tensor:
        if self.network is None or context is None:
            raise RuntimeError("LearnedBaseline needs the model's context features (bind() and context=...)")
        return self.network(context.detach()).squeeze(-1)  # (B,)

    def residual(self, signal: Tensor, context: Tensor | None) -> Tensor:
        return signal - self.predict(context).detach()

    def loss(self, signal: Tensor, context: Tensor | None = None) -> Tensor:
        target = signal.detach() - self.mean / self.weight.clamp_min(torch.finfo(self.weight.dtype).tiny)
        return (target - self.predict(context)) ** 2
