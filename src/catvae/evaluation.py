"""Evaluation bounds for latent-variable models with categorical latents."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from catvae.relaxations import categorical_log_prob, sample_categorical_by_inversion


@torch.no_grad()
def importance_weighted_nll(logits: Tensor, log_joint: Callable[[Tensor], Tensor], n_samples: int = 1000,
                            chunk_size: int = 100) -> Tensor:
    """Importance-weighted bound (Burda et al. 2016) with the encoder q(z|x) as proposal:

        -log p(x) <= -log (1/S) sum_s p(x, z_s) / q(z_s|x),   z_s ~ q(z|x) one-hot,

    for logits (B, N, K) and ``log_joint(z (C, B, N, K)) -> log p(x, z) (C, B)``. The S samples are
    drawn ``chunk_size`` at a time and folded into a running logsumexp, so memory is O(chunk_size).
    Returns the bound per example, (B,).
    """
    if n_samples < 1 or chunk_size < 1:
        raise ValueError(f"n_samples and chunk_size must be >= 1, got {n_samples} and {chunk_size}")
    total = torch.full(logits.shape[:1], -math.inf, device=logits.device)  # (B,)
    for start in range(0, n_samples, chunk_size):
        size = min(chunk_size, n_samples - start)
        z = sample_categorical_by_inversion(logits, (size,))  # (C, B, N, K)
        log_w = log_joint(z).float() - categorical_log_prob(logits, z)  # (C, B)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
    return math.log(n_samples) - total
