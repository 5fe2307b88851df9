"""VIMCO: the multi-sample score-function estimator of a multi-sample bound."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from catvae.estimators.base import Estimate, Estimator, Objective
from catvae.estimators.score_function import check_sample_count
from catvae.relaxations import categorical_log_prob, sample_categorical


def leave_one_out_bounds(log_w: Tensor) -> Tensor:
    """L_{-s} = log 1/S (sum_{j != s} w_j + exp(mean_{j != s} log w_j)) for log_w (S, B) -> (S, B):
    the bound with w_s replaced by the geometric mean of the others (Mnih & Rezende 2016, Eq. 10)."""
    n = log_w.shape[0]
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (n - 1)  # (S, B)
    replaced = log_w.unsqueeze(0).expand(n, -1, -1).clone()  # (S replaced, S, B)
    index = torch.arange(n, device=log_w.device)
    replaced[index, index] = others_mean
    return torch.logsumexp(replaced, dim=1) - math.log(n)


class VIMCO(Estimator):
    """VIMCO (Mnih & Rezende 2016): optimises the S-sample bound L = log 1/S sum_s w_s, with
    log w_s = -f(z_s) (f is -log p(x, z) + log q(z|x): ``analytic_kl`` is False), by

        grad L = sum_s (L - L_{-s}) grad log q(z_s) + sum_s w~_s grad log w_s,   w~_s = w_s / sum_j w_j,

    where L_{-s} is the leave-one-out bound of :func:`leave_one_out_bounds`. Unbiased for grad E[L].
    ``loss`` is -L; one objective call on (S, B, N, K).
    """

    name = "vimco"
    unbiased = True
    analytic_kl = False

    def __init__(self, n_samples: int = 4, name: str | None = None, optim: dict | None = None):
        super().__init__(name, optim)
        self.n_samples = check_sample_count(n_samples, 2)

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        n = self.n_samples
        z = sample_categorical(logits, (n,))  # (S, B, N, K)
        log_w = -objective(z)  # (S, B)
        bound = torch.logsumexp(log_w, dim=0) - math.log(n)  # (B,)
        signal = (bound.unsqueeze(0) - leave_one_out_bounds(log_w)).detach()  # (S, B)
        log_q = categorical_log_prob(logits, z)  # (S, B)
        surrogate = -(bound + (signal * log_q).sum(0))
        return Estimate(loss=-bound, surrogate=surrogate, z=z)
