"""Relaxed and straight-through estimators: Gumbel-Softmax, ST Gumbel-Softmax, decoupled ST Gumbel-Softmax, ST,
Gumbel-Rao, ReinMax, GST, ZGR."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from catvae.estimators.base import Estimate, Estimator, Objective, TemperatureEstimator
from catvae.relaxations import (check_temperature, conditional_gumbel, decoupled_gumbel_softmax, gumbel_softmax,
                                sample_categorical, straight_through)
from catvae.validation import check_integer


class GumbelSoftmax(TemperatureEstimator):
    """Gumbel-Softmax (Jang et al. 2017, Eq. 2; Maddison et al. 2017): z = softmax((logits + g) / tau).

    The gradient d f(z) / d logits of the relaxed sample is biased for E_q[f] at tau > 0 and
    its variance grows as tau -> 0. ``tau`` is set by a temperature schedule callback.
    """

    name = "gumbel_softmax"
    hard = False

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        z = gumbel_softmax(logits, self.tau, hard=self.hard)  # (B, N, K)
        loss = objective(z)  # (B,)
        return Estimate(loss=loss, surrogate=loss, z=z)


class STGumbelSoftmax(GumbelSoftmax):
    """Straight-Through Gumbel-Softmax (Jang et al. 2017, Section 2.2): the forward pass uses the
    one-hot z = one_hot(argmax(logits + g)), the backward pass the gradient of the soft sample
    softmax((logits + g) / tau).
    """

    name = "st_gumbel_softmax"
    hard = True


class DecoupledSTGumbelSoftmax(TemperatureEstimator):
    """Decoupled ST Gumbel-Softmax (Shah et al. 2024): :func:`~catvae.relaxations.decoupled_gumbel_softmax`, a
    one-hot forward sample of softmax(logits / tau_forward) and the gradient of softmax(logits / tau_backward + g)
    with the same noise g. ``tau`` is tau_backward (the temperature schedules set ``tau``, as for every ST
    estimator; a schedule with ``attribute: tau_forward`` sets the other). With both at 1 it is
    ``st_gumbel_softmax`` at tau = 1, draw for draw. For tau_forward != 1 the samples are not drawn from
    q = softmax(logits): the objective is then evaluated under the tempered distribution, while the model's KL
    term stays that of q (as in the paper). One objective evaluation.
    """

    name = "decoupled_st"

    def __init__(self, tau_forward: float = 1.0, tau_backward: float = 1.0, name: str | None = None,
                 optim: dict | None = None):
        check_temperature(tau_backward, "estimator.tau_backward")
        super().__init__(tau_backward, name, optim)
        self.tau_forward = tau_forward

    @property
    def tau_forward(self) -> float:
        return self._tau_forward

    @tau_forward.setter
    def tau_forward(self, value: float) -> None:
        check_temperature(value, "estimator.tau_forward")
        self._tau_forward = float(value)

    @property
    def tau_backward(self) -> float:
        return self.tau

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        z = decoupled_gumbel_softmax(logits, self.tau_forward, self.tau).to(logits.dtype)  # (B, N, K)
        loss = objective(z)  # (B,)
        return Estimate(loss=loss, surrogate=loss, z=z)

    def extra_repr(self) -> str:
        return f"tau_forward={self.tau_forward:g}, tau_backward={self.tau:g}"


class StraightThroughEstimator(Estimator):
    """Shared shape of the straight-through family: z = hard one-hot sample D ~ q in the forward pass,
    gradient of a differentiable ``proxy(logits, D)`` in the backward pass; loss = surrogate = f(z)."""

    def proxy(self, logits: Tensor, hard: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        hard = sample_categorical(logits)  # (B, N, K)
        z = straight_through(hard, self.proxy(logits, hard)).to(logits.dtype)
        loss = objective(z)  # (B,)
        return Estimate(loss=loss, surrogate=loss, z=z)


class TemperedStraightThrough(TemperatureEstimator, StraightThroughEstimator):
    """A straight-through estimator whose proxy has a temperature ``tau``."""


class StraightThrough(TemperedStraightThrough):
    """Straight-through (Bengio et al. 2013, as in Jang et al. 2017, Table 1): z ~ Cat(softmax(logits))
    one-hot, gradient of softmax(logits / tau). Unbiased at tau = 1 for objectives linear in z."""

    name = "st"

    def proxy(self, logits: Tensor, hard: Tensor) -> Tensor:
        return F.softmax(logits.float() / self.tau, dim=-1)


class GumbelRao(TemperedStraightThrough):
    """Gumbel-Rao (Paulus et al. 2021, Eq. 7): the ST Gumbel-Softmax gradient Rao-Blackwellised over
    the Gumbel noise given the sample D,

        grad ~ d/d logits  (1/M) sum_m softmax((l + g_m) / tau),   g_m ~ Gumbel | argmax(l + g) = D,

    with M = ``n_samples`` conditional draws (:func:`~catvae.relaxations.conditional_gumbel`), each g_m
    held fixed under differentiation. Same expectation as ST Gumbel-Softmax, lower variance; one
    objective evaluation.
    """

    name = "gumbel_rao"

    def __init__(self, tau: float = 1.0, n_samples: int = 10, name: str | None = None, optim: dict | None = None):
        super().__init__(tau, name, optim)
        self.n_samples = check_integer("estimator.n_samples", n_samples)

    def proxy(self, logits: Tensor, hard: Tensor) -> Tensor:
        log_p = torch.log_softmax(logits.float(), dim=-1)  # (B, N, K)
        # The noise g = (l + g | D) - l is held fixed while differentiating, as in the ST-GS gradient it
        # averages; masked classes (l = -inf) keep -inf scores.
        noise = conditional_gumbel(logits, hard, (self.n_samples,)) - log_p  # (M, B, N, K)
        scores = log_p + torch.where(torch.isfinite(log_p), noise, torch.zeros_like(noise)).detach()
        scores = scores - scores.amax(dim=-1, keepdim=True).detach()
        return F.softmax(scores / self.tau, dim=-1).mean(0)  # (B, N, K)


class ReinMax(TemperedStraightThrough):
    """ReinMax (Liu et al. 2023, Algorithm 2): a second-order (Heun's method) straight-through
    gradient. With pi_0 = softmax(logits) and the sample D,

        pi_1 = softmax( sg(log((D + softmax(logits / tau)) / 2) - logits) + logits ),
        proxy = 2 pi_1 - pi_0 / 2,

    (sg = stop-gradient): the value of pi_1 is (D + softmax(logits/tau))/2 and its Jacobian is that of
    a softmax at that point. Masked classes keep a zero proxy and a finite gradient. Its authors ask for
    tau >= 1 (their implementation refuses less); a Gumbel-Softmax schedule that lowers tau leaves that range.
    """

    name = "reinmax"

    def proxy(self, logits: Tensor, hard: Tensor) -> Tensor:
        logits = logits.float()
        pi_0 = F.softmax(logits, dim=-1)
        midpoint = (hard.float() + F.softmax(logits / self.tau, dim=-1)) / 2
        # Where the midpoint is 0 (masked or underflowed classes) the shifted logit is -inf, never NaN.
        shift = torch.where(midpoint > 0, midpoint.log() - logits, torch.full_like(logits, -math.inf)).detach()
        pi_1 = F.softmax(logits + shift, dim=-1)
        return 2 * pi_1 - pi_0 / 2


class GappedStraightThrough(TemperedStraightThrough):
    """Gapped Straight-Through (Fan et al. 2022): the ST Gumbel-Softmax gradient with the Gumbel noise
    replaced by a deterministic perturbation m(theta, D) that makes the sampled class i the argmax of the
    perturbed logits by a gap kappa (theta = logits, k = argmax theta):

        theta~_i = theta_k,   theta~_j = min(theta_j, theta_k - kappa)  (j != i),
        theta~   = theta + sg(theta~ - theta),   proxy = softmax(theta~ / tau),

    so the gradient is the softmax Jacobian at theta~, with no noise beyond the sample D itself.
    ``gap`` is kappa: a positive number (the paper's default, 1.0), or ``"adaptive"`` for the paper's
    GST-p choice kappa = -log(1 - pi_i) / pi_i, pi_i = softmax(theta)_i (which tends to 1 as pi_i -> 0).
    Masked classes (theta_j = -inf) stay at -inf.
    """

    name = "gst"

    def __init__(self, tau: float = 1.0, gap: float | str = 1.0, name: str | None = None, optim: dict | None = None):
        super().__init__(tau, name, optim)
        adaptive = gap == "adaptive"
        if not adaptive and (isinstance(gap, (bool, str)) or not math.isfinite(gap) or gap <= 0):
            raise ValueError(f"estimator.gap must be a positive finite number or 'adaptive', got {gap!r}")
        self.gap = gap

    def gap_size(self, logits: Tensor, hard: Tensor) -> Tensor | float:
        """kappa, a number or (B, N, 1) for the adaptive choice."""
        if self.gap != "adaptive":
            return float(self.gap)
        pi_i = (F.softmax(logits, dim=-1) * hard).sum(-1, keepdim=True)
        pi_i = pi_i.clamp(1e-12, 1 - 1e-5)  # kappa -> 1 as pi_i -> 0; finite as pi_i -> 1
        return -torch.log1p(-pi_i) / pi_i

    def proxy(self, logits: Tensor, hard: Tensor) -> Tensor:
        logits, hard = logits.float(), hard.float()
        top = logits.amax(dim=-1, keepdim=True)  # theta_k, (B, N, 1)
        capped = torch.minimum(logits, top - self.gap_size(logits, hard))
        perturbed = torch.where(hard > 0, top.expand_as(logits), capped)
        shift = torch.where(torch.isfinite(logits), perturbed - logits, torch.zeros_like(logits)).detach()
        return F.softmax((logits + shift - top.detach()) / self.tau, dim=-1)


class ZGR(StraightThroughEstimator):
    """ZGR (Shekhovtsov 2023, "Cold Rao-Blackwellized Straight-Through Gumbel-Softmax"): the limit tau -> 0 of
    Gumbel-Rao in closed form. With the sample D and p = softmax(logits), the gradient is M f'(D) with

        M = 1/2 [ diag(p) - p p^T + (D - p)(D - p)^T ],

    the average of ST's softmax Jacobian and a DARN term whose learning signal f'(D).(D - p) multiplies
    grad log p_D = D - p, each variable with its own signal (for one Bernoulli variable, DARN with x_bar = 1/2). As a
    proxy: 1/2 [p + (D - sg(p)) log p_D]: one objective evaluation, no temperature. Biased for nonlinear f (clearly
    for a cubic one), exact in expectation for f linear in z (both halves are). The tests check M against
    Gumbel-Rao's conditional Jacobian at small tau.
    """

    name = "zgr"

    def proxy(self, logits: Tensor, hard: Tensor) -> Tensor:
        log_p = torch.log_softmax(logits.float(), dim=-1)  # (B, N, K)
        p = log_p.exp()
        log_p_sample = torch.where(hard > 0, log_p, torch.zeros_like(log_p)).sum(-1, keepdim=True)  # (B, N, 1)
        return 0.5 * (p + (hard - p.detach()) * log_p_sample)  # (B, N, K)
