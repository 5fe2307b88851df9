"""REBAR and RELAX: score-function estimators with relaxation-based control variates whose own
parameters are trained to minimise the estimator's variance."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from catvae.estimators.base import Estimate, Estimator, Objective, masked_as_zero
from catvae.models.networks import mlp
from catvae.relaxations import categorical_log_prob, check_temperature, conditional_gumbel, one_hot_argmax, perturbed_logits
from catvae.validation import check_integer


class RelaxedControlVariate(Estimator):
    """The shared REBAR/RELAX estimator (Tucker et al. 2017, Eq. 5; Grathwohl et al. 2018, Eq. 5):
    with z = log_softmax(logits) + g (Gumbel), b = one_hot(argmax z), z~ ~ p(z | b) (conditional
    Gumbel, reparameterised) and a control variate c(.) of relaxed inputs,

        g_logits = [f(b) - c(z~)] grad log q(b) + grad c(z) - grad c(z~),

    unbiased for any c. The objective's own parameters (the decoder) get grad f(b). The control
    variate's parameters phi are trained to minimise V = E ||g_logits||^2 (= the variance plus a constant,
    since the mean does not depend on them); the per-example gradient w.r.t. the logits is the
    variance proxy, chosen because it is what every encoder weight's gradient is built from. phi follows
    the gradient of V^ / V0, V^ the batch's sum of ||g||^2 and V0 (a constant) the same sum for REINFORCE
    without control variate, sum f(b)^2 ||b - softmax(logits)||^2 (grad log q(b) = b - softmax(logits)):
    the variance gradient relative to the problem's scale, so that a plain SGD step (Table 1's optimiser)
    is as long when f is hundreds of nats as when it is one. That second-order gradient enters the
    surrogate as sg(d(V^/V0)/d phi) . phi, so it reaches only phi.
    """

    unbiased = True
    double_backward = True

    def evaluations(self) -> int:
        return 4  # f(b), and c at z, z~ and the detached z~ (REBAR: f of their relaxations)

    def control_variate(self, relaxed: Tensor, objective: Objective) -> Tensor:
        """c(z) for Gumbel-perturbed logits ``relaxed`` (..., B, N, K) -> (..., B)."""
        raise NotImplementedError

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        z = perturbed_logits(F.log_softmax(logits.float(), dim=-1))  # (B, N, K), differentiable in logits
        b = one_hot_argmax(z.detach()).to(logits.dtype)  # (B, N, K)
        z_cond = conditional_gumbel(logits, b)  # (B, N, K), differentiable in logits
        loss = objective(b)  # (B,)
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return Estimate(loss=loss, surrogate=loss, z=b)
        # c at z, at z~, and at z~ cut from the logits: the last multiplies grad log q(b), so it must be a
        # constant for the logits yet keep its dependence on c's parameters for the variance gradient.
        c_z, c_cond, c_coefficient = self.control_variate(torch.stack([z, z_cond, z_cond.detach()]), objective)
        log_q = categorical_log_prob(logits, b)  # (B,)
        score = (loss.detach() - c_coefficient) * log_q + c_z - c_cond  # (B,)
        (grad_logits,) = torch.autograd.grad(score.sum(), logits, create_graph=True)  # (B, N, K)
        surrogate = loss + (grad_logits.detach() * masked_as_zero(logits)).sum((-1, -2))
        params = [p for p in self.parameters() if p.requires_grad]
        if params:
            score_norms = (b - F.softmax(logits.detach().float(), dim=-1)).pow(2).sum((-1, -2))  # (B,)
            scale = (loss.detach().pow(2) * score_norms).sum().clamp_min(torch.finfo(grad_logits.dtype).tiny)
            variance_grads = torch.autograd.grad(grad_logits.pow(2).sum() / scale, params, allow_unused=True)
            tuning = sum((g.detach() * p).sum() for g, p in zip(variance_grads, params) if g is not None)
            surrogate = surrogate + tuning  # the same in every element: the batch mean passes it on whole
        return Estimate(loss=loss, surrogate=surrogate, z=b)


class REBAR(RelaxedControlVariate):
    """REBAR (Tucker et al. 2017): c(z) = eta * f(softmax(z / lambda)), with the scale eta and the
    temperature lambda (as log lambda) learned to minimise variance. ``learn`` = False keeps them fixed.
    """

    name = "rebar"

    def __init__(self, eta: float = 1.0, temperature: float = 0.5, learn: bool = True,
                 name: str | None = None, optim: dict | None = None):
        super().__init__(name, optim)
        check_temperature(temperature, "estimator.temperature")
        if not math.isfinite(eta):
            raise ValueError(f"estimator.eta must be a finite number, got {eta!r}")
        self.eta = nn.Parameter(torch.tensor(float(eta)), requires_grad=learn)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn)

    def relax(self, relaxed: Tensor) -> Tensor:
        """softmax(z / lambda), shifted by the max and with masked (-inf) classes kept out of the
        division, so that neither the value nor d/d lambda overflows."""
        finite = torch.isfinite(relaxed)
        safe = torch.where(finite, relaxed, torch.zeros_like(relaxed))
        shifted = safe - safe.amax(dim=-1, keepdim=True).detach()
        scores = torch.where(finite, shifted / self.log_temperature.exp(), torch.full_like(safe, -math.inf))
        return F.softmax(scores, dim=-1)

    def control_variate(self, relaxed: Tensor, objective: Objective) -> Tensor:
        return self.eta * objective(self.relax(relaxed))


class RELAX(REBAR):
    """RELAX (Grathwohl et al. 2018, Section 3.3 "discrete"): the REBAR control variate plus a learned
    network, c(z) = eta * f(softmax(z / lambda)) + r(softmax(z / lambda)), r an MLP of the relaxed
    sample (one hidden layer of ``hidden_size`` ReLU units, built at ``bind``)."""

    name = "relax"

    def __init__(self, hidden_size: int = 200, eta: float = 1.0, temperature: float = 0.5,
                 name: str | None = None, optim: dict | None = None):
        super().__init__(eta, temperature, True, name, optim)
        self.hidden_size = check_integer("estimator.hidden_size", hidden_size)
        self.network: nn.Module | None = None

    def bind(self, n_vars: int, n_classes: int, context_dim: int) -> None:
        super().bind(n_vars, n_classes, context_dim)
        self.network = mlp([n_vars * n_classes, self.hidden_size, 1])

    def control_variate(self, relaxed: Tensor, objective: Objective) -> Tensor:
        if self.network is None:
            raise RuntimeError("RELAX builds its network at bind(n_vars, n_classes, context_dim)")
        soft = self.relax(relaxed)
        return self.eta * objective(soft) + self.network(soft.flatten(-2)).squeeze(-1)
