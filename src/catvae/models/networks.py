"""Plain MLP building blocks and the Bernoulli likelihood of their image logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(sizes: Sequence[int], final_activation: bool = False) -> nn.Sequential:
    """Linear layers sizes[0] -> sizes[1] -> ... with ReLU between them (and after the last one
    only if ``final_activation``: logits must stay unconstrained)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def bernoulli_nll(x_logits: Tensor, x: Tensor) -> Tensor:
    """-log Bernoulli(x; sigmoid(l)) = sum_d softplus(l_d) - x_d l_d over the last dim, l = ``x_logits``, x
    broadcastable to l.

    On the CPU without autograd (evaluation, where l is chunk x batch x D) the sum is built in place from
    softplus(l) = max(l, 0) + log(1 + exp(-|l|)), in 0.43 of the time of torch's fused BCE, whose log-sigmoid
    kernel is slow there (docs/performance.md); rounding 1 + exp(-|l|) moves a pixel's term by at most 2^-24
    nats. Otherwise (training; any GPU) it is torch's BCE with logits.
    """
    if x_logits.device.type != "cpu" or (torch.is_grad_enabled() and (x_logits.requires_grad or x.requires_grad)):
        return F.binary_cross_entropy_with_logits(x_logits, x.expand_as(x_logits), reduction="none").sum(-1)
    softplus = x_logits.clamp(min=0).add_(x_logits.abs().neg_().exp_().add_(1).log_())
    return softplus.sub_(x * x_logits).sum(-1)
