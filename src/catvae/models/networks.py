"""Plain MLP building blocks and the Bernoulli likelihood of their image logits."""

from __future__ import annotations

from collections.abc import Sequence

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
    """-log Bernoulli(x; sigmoid(x_logits)) = sum_d BCE(x_logits_d, x_d) over the last dim; x broadcastable to
    x_logits."""
    return F.binary_cross_entropy_with_logits(x_logits, x.expand_as(x_logits), reduction="none").sum(-1)
