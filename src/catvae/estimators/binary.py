"""Estimators for Bernoulli latents (K = 2): ARM and DisARM.

A Bernoulli variable is a K = 2 categorical with logits (l_0, l_1); its logit is phi = l_1 - l_0 and
P(z = 1) = sigmoid(phi). Both estimators draw one u ~ U(0, 1)^N per example and evaluate f at an
antithetic pair of samples, in one objective call on (2, B, N, 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from catvae.estimators.base import Estimate, Estimator, Objective


def antithetic_pair(phi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """u ~ U(0,1), b = 1[u < sigmoid(phi)], b~ = 1[1 - u < sigmoid(phi)]: both ~ Bernoulli(sigmoid(phi)).
    Returns (u, b, b~), each shaped like phi (B, N)."""
    u = torch.rand_like(phi, dtype=torch.float32)
    p = torch.sigmoid(phi.detach().float())
    return u, (u < p).float(), (1 - u < p).float()


def as_one_hot(bits: Tensor) -> Tensor:
    """(..., N) in {0, 1} -> one-hot (..., N, 2) with class 1 meaning z = 1."""
    return F.one_hot(bits.long(), 2).float()


class BinaryPairEstimator(Estimator):
    """Shared ARM/DisARM shape: surrogate = (f(b) + f(b~))/2 + sum_n sg(g_n) phi_n, where g_n is the
    per-variable gradient estimate for phi_n given by :meth:`phi_gradient`."""

    unbiased = True
    binary_only = True

    def evaluations(self) -> int:
        return 2  # the antithetic pair

    def phi_gradient(self, phi: Tensor, u: Tensor, b: Tensor, b_anti: Tensor, f: Tensor, f_anti: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        phi = logits[..., 1] - logits[..., 0]  # (B, N)
        u, b, b_anti = antithetic_pair(phi)
        z = as_one_hot(torch.stack([b, b_anti])).to(logits.dtype)  # (2, B, N, 2)
        f_pair = objective(z)  # (2, B)
        grad_phi = self.phi_gradient(phi, u, b, b_anti, f_pair[0].detach(), f_pair[1].detach())  # (B, N)
        surrogate = f_pair.mean(0) + (grad_phi.detach() * phi.float()).sum(-1)
        return Estimate(loss=f_pair.mean(0), surrogate=surrogate, z=z)


class ARM(BinaryPairEstimator):
    """Augment-REINFORCE-merge (Yin & Zhou 2019, Theorem 1), in the antithetic form:
    with b~ = 1[u > sigmoid(-phi)] and b = 1[u < sigmoid(phi)],

        g_phi = (f(b~) - f(b)) (u - 1/2).
    """

    name = "arm"

    def phi_gradient(self, phi, u, b, b_anti, f, f_anti):
        return (f_anti - f)[:, None] * (u - 0.5)


class DisARM(BinaryPairEstimator):
    """DisARM (Dong, Mnih & Tucker 2020, Eq. 5): ARM with the augmentation integrated out,

        g_phi = 1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigmoid(|phi|),

    never worse in variance than ARM, and zero wherever b = b~.
    """

    name = "disarm"

    def phi_gradient(self, phi, u, b, b_anti, f, f_anti):
        sign = 1 - 2 * b_anti  # (-1)^{b~}
        return 0.5 * (f - f_anti)[:, None] * sign * (b != b_anti).float() * torch.sigmoid(phi.detach().abs().float())
