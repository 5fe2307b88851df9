"""Evaluation bounds for latent-variable models with categorical latents."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from catvae.relaxations import categorical_log_prob, sample_categorical_by_inversion


@torch.no_grad()
def negative_log_mean_weight(draw_log_weights: Callable[[int], Tensor], n_samples: int = 1000,
                             chunk_size: int = 100) -> Tensor:
    """-log (1/S) sum_s w_s from ``draw_log_weights(C) -> log w (C, B)`` for C fresh draws, called
    ``chunk_size`` draws at a time and folded into a running logsumexp, so memory is O(chunk_size).
    Returns (B,).
    """
    if n_samples < 1 or chunk_size < 1:
        raise ValueError(f"n_samples and chunk_size must be >= 1, got {n_samples} and {chunk_size}")
    total = None
    for start in range(0, n_samples, chunk_size):
        chunk = torch.logsumexp(draw_log_weights(min(chunk_size, n_samples - start)).float(), dim=0)  # (B,)
        total = chunk if total is None else torch.logaddexp(total, chunk)
    return math.log(n_samples) - total


@torch.no_grad()
def importance_weighted_nll(logits: Tensor, log_joint: Callable[[Tensor], Tensor], n_samples: int = 1000,
                            chunk_size: int = 100) -> Tensor:
    """Importance-weighted bound (Burda et al. 2016) with the encoder q(z|x) as proposal:

        -log p(x) <= -log (1/S) sum_s p(x, z_s) / q(z_s|x),   z_s ~ q(z|x) one-hot,

    for logits (B, N, K) and ``log_joint(z (C, B, N, K)) -> log p(x, z) (C, B)``, by
    :func:`negative_log_mean_weight`. Returns the bound per example, (B,).
    """
    def draw_log_weights(size: int) -> Tensor:
        z = sample_categorical_by_inversion(logits, (size,))  # (C, B, N, K)
        return log_joint(z).float() - categorical_log_prob(logits, z)  # (C, B)

    return negative_log_mean_weight(draw_log_weights, n_samples, chunk_size)
