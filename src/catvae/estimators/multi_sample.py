"""VIMCO: the multi-sample score-function estimator of a multi-sample bound."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from catvae.estimators.base import Estimate, Objective
from catvae.estimators.score_function import MultiSampleEstimator


def leave_one_out_bounds(log_w: Tensor) -> Tensor:
    """L_{-s} = log 1/S (sum_{j != s} w_j + exp(mean_{j != s} log w_j)) for log_w (S, B) -> (S, B):
    the bound with w_s replaced by the geometric mean of the others (Mnih & Rezende 2016, Eq. 10)."""
    n = log_w.shape[0]
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (n - 1)  # (S, B)
    replaced = log_w.unsqueeze(0).expand(n, -1, -1).clone()  # (S replaced, S, B)
    index = torch.arange(n, device=log_w.device)
    replaced[index, index] = others_mean
    return torch.logsumexp(replaced, dim=1) - math.log(n)


class VIMCO(MultiSampleEstimator):
    """VIMCO (Mnih & Rezende 2016): optimises the S-sample bound L = log 1/S sum_s w_s, with
    log w_s = -f(z_s) (f is -log p(x, z) + log q(z|x): ``analytic_kl`` is False), by

        grad L = sum_s (L - L_{-s}) grad log q(z_s) + sum_s w~_s grad log w_s,   w~_s = w_s / sum_j w_j,

    where L_{-s} is the leave-one-out bound of :func:`leave_one_out_bounds`. Unbiased for grad E[L].
    ``loss`` is -L; one objective call on (S, B, N, K).
    """

    name = "vimco"
    unbiased = True
    analytic_kl = False

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        z, f, log_q = self.draw(logits, objective)  # (S, B, N, K), (S, B), (S, B)
        n = self.n_samples
        log_w = -f  # (S, B)
        bound = torch.logsumexp(log_w, dim=0) - math.log(n)  # (B,)
        signal = (bound.unsqueeze(0) - leave_one_out_bounds(log_w)).detach()  # (S, B)
        surrogate = -(bound + (signal * log_q).sum(0))
        return Estimate(loss=-bound, surrogate=surrogate, z=z)
