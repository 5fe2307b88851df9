"""Score-function (REINFORCE) estimators: REINFORCE with baselines (and NVIL), RLOO, MuProp, DARN, IndeCateR and
double control variates."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from catvae.estimators.base import Estimate, Estimator, Objective, masked_as_zero
from catvae.estimators.baselines import Baseline, MovingAverageBaseline
from catvae.relaxations import categorical_log_prob, sample_categorical
from catvae.validation import check_integer


def score_function_surrogate(loss: Tensor, log_q: Tensor, advantage: Tensor) -> Tensor:
    """Surrogate whose gradient is grad f(z) + A grad log q(z) (Williams 1992).

    ``loss`` carries the pathwise part (objective parameters, e.g. the decoder), the advantage A
    (f - b, or another centred signal) is detached so only log q(z) carries the score term.
    """
    return loss + advantage.detach() * log_q


def value_and_slope(objective: Objective, point: Tensor) -> tuple[Tensor, Tensor]:
    """f(point) (B,) and its gradient f'(point) = d f / d z at ``point`` (B, N, K), the slope detached.

    ``point`` enters as a fresh leaf, so f's graph to its own parameters (the decoder) is kept for a later
    backward pass, while no gradient flows back to whatever produced ``point``. Works under ``no_grad``.
    """
    with torch.enable_grad():
        leaf = point.detach().requires_grad_(True)
        value = objective(leaf)
        (slope,) = torch.autograd.grad(value.sum(), leaf, retain_graph=True)
    return value, slope


class BaselineEstimator(Estimator):
    """An estimator holding a :class:`Baseline` (bound to the context size, trained if it learns)."""

    def __init__(self, baseline: Baseline | None = None, name: str | None = None, optim: dict | None = None):
        super().__init__(name, optim)
        self.baseline = baseline if baseline is not None else MovingAverageBaseline()

    def bind(self, n_vars: int, n_classes: int, context_dim: int) -> None:
        super().bind(n_vars, n_classes, context_dim)
        self.baseline.bind(context_dim)

    def centred(self, signal: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor | float]:
        """(advantage, baseline training loss, the scale s the advantage was divided by) for the signal (B,);
        updates the running statistics in training, after using them."""
        signal = signal.detach()
        advantage, scale = self.baseline.advantage(signal, context), self.baseline.scale()
        baseline_loss = self.baseline.loss(signal, context)
        if self.training:
            self.baseline.update(signal, context)
        return advantage, baseline_loss, scale


class Reinforce(BaselineEstimator):
    """REINFORCE: z ~ q hard one-hot, grad = A grad log q(z) + grad f(z), A = (f(z) - b) / s.

    Unbiased in direction for any baseline b and scale s that do not depend on z. Options
    (``baseline``): :class:`NoBaseline`; :class:`MovingAverageBaseline` (the default; with
    ``normalise_variance`` it is the variance-normalised SF of Jang et al.'s Table 1); and
    :class:`LearnedBaseline`, which makes this NVIL (Mnih & Gregor 2014).
    """

    name = "reinforce"
    unbiased = True

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        z = sample_categorical(logits)  # (B, N, K), no gradient
        loss = objective(z)  # (B,)
        log_q = categorical_log_prob(logits, z)  # (B,)
        advantage, baseline_loss, scale = self.centred(loss, context)
        surrogate = score_function_surrogate(loss, log_q, advantage) + baseline_loss
        return Estimate(loss=loss, surrogate=surrogate, z=z, encoder_scale=scale)


class MultiSampleEstimator(Estimator):
    """Draws S = ``n_samples`` samples per example and calls the objective once on (S, B, N, K)."""

    def __init__(self, n_samples: int = 4, name: str | None = None, optim: dict | None = None):
        super().__init__(name, optim)
        self.n_samples = check_integer("estimator.n_samples", n_samples, minimum=2)

    def evaluations(self) -> int:
        return self.n_samples

    def draw(self, logits: Tensor, objective: Objective) -> tuple[Tensor, Tensor, Tensor]:
        """(z (S, B, N, K) one-hot, f(z) (S, B), log q(z) (S, B))."""
        self.check_logits(logits)
        z = sample_categorical(logits, (self.n_samples,))
        return z, objective(z), categorical_log_prob(logits, z)


class RLOO(MultiSampleEstimator):
    """REINFORCE leave-one-out (Kool et al. 2019, Eq. 8): S samples, each baselined by the mean of
    the other S - 1,

        grad = 1/S sum_s [ (f(z_s) - 1/(S-1) sum_{j != s} f(z_j)) grad log q(z_s) + grad f(z_s) ],

    where f(z_s) - mean_{j != s} f(z_j) = S/(S-1) (f(z_s) - mean_j f(z_j)). Unbiased.
    """

    name = "rloo"
    unbiased = True

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        z, loss, log_q = self.draw(logits, objective)  # (S, B, N, K), (S, B), (S, B)
        n = self.n_samples
        advantage = n / (n - 1) * (loss.detach() - loss.detach().mean(0))  # (S, B)
        surrogate = score_function_surrogate(loss, log_q, advantage).mean(0)  # (B,)
        return Estimate(loss=loss.mean(0), surrogate=surrogate, z=z)


class MuProp(BaselineEstimator):
    """MuProp (Gu et al. 2016, Eq. 6): a first-order Taylor expansion of f around the mean-field
    point z_bar = pi = softmax(logits) as control variate,

        grad = [f(z) - f(pi) - f'(pi).(z - pi) - b] grad log q(z) + f'(pi) . grad pi + grad f(z),

    unbiased because E_q[f(pi) + f'(pi).(z - pi)] = f(pi), whose gradient is the second term. The
    residual is further centred (and, as in Jang et al.'s Table 1, variance-normalised) by
    ``baseline``; with normalisation both encoder terms are divided by the same scale s, so the
    encoder's gradient keeps its direction. Costs one extra objective evaluation and backward pass at pi.
    """

    name = "muprop"
    unbiased = True

    def evaluations(self) -> int:
        return 2  # the sample and the mean-field point

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        z = sample_categorical(logits)  # (B, N, K)
        pi = torch.softmax(logits.float(), dim=-1).to(logits.dtype)  # (B, N, K)
        f_bar, slope = value_and_slope(objective, pi)  # f(pi) (B,), f'(pi) (B, N, K)
        loss = objective(z)  # (B,)
        log_q = categorical_log_prob(logits, z)  # (B,)
        taylor = f_bar.detach() + (slope * (z - pi.detach())).sum((-1, -2))  # (B,)
        advantage, baseline_loss, scale = self.centred(loss.detach() - taylor, context)
        # gradient f'(pi) . grad pi, divided by the baseline's scale like the score term it complements
        mean_field_term = (slope * pi).sum((-1, -2)) / scale
        surrogate = score_function_surrogate(loss, log_q, advantage) + mean_field_term + baseline_loss
        return Estimate(loss=loss, surrogate=surrogate, z=z, encoder_scale=scale)


class DARN(BaselineEstimator):
    """DARN (Gregor et al. 2014; written as in Gu et al. 2016, Eq. 5-7): the learning signal is a
    first-order Taylor expansion of f taken at the sample z itself and measured from a fixed point x_bar,

        grad = [f'(z).(z - x_bar) - b] grad log q(z) + grad f(z),      x_bar = 1/K in every class,

    i.e. 1/2 for Bernoulli latents, as in DARN; for K > 2 we follow MuProp's categorical choice
    (masked classes included in the 1/K). Unlike MuProp nothing corrects the expansion, so the estimator is
    biased wherever f is not linear in z; for linear f the signal is f(z) minus a constant and the
    gradient is unbiased. ``baseline`` centres the signal (variance-normalised in Jang et al.'s Table 1).
    Costs one extra backward pass, through the objective only, for f'(z).
    """

    name = "darn"

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        z = sample_categorical(logits)  # (B, N, K)
        loss, slope = value_and_slope(objective, z)  # f(z) (B,), f'(z) (B, N, K)
        signal = (slope * (z - 1.0 / logits.shape[-1])).sum((-1, -2))  # (B,)
        advantage, baseline_loss, scale = self.centred(signal, context)
        surrogate = score_function_surrogate(loss, categorical_log_prob(logits, z), advantage) + baseline_loss
        return Estimate(loss=loss, surrogate=surrogate, z=z, encoder_scale=scale)


class IndeCateR(Estimator):
    """IndeCateR (De Smet, Sansone & Zuidberg Dos Martires 2023, Eq. 6): the score function Rao-Blackwellised over
    each variable in turn. For variable n the sum over its K values is exact while the others keep their sampled
    values z_{-n}:

        grad = 1/S sum_s sum_n sum_k grad q(z_n = k) f(z^s_{-n}, z_n = k),

    unbiased (E over z_{-n} of the inner sum is d E_q[f] / d logits_n). Costs S*N*K objective evaluations, made in one
    objective call on (S*N*K, B, N, K); the sample's own f(z) is among them (z_n = z^s_n) and carries the pathwise
    gradient (the decoder's). The values f(., k) are centred over k before weighting, which changes nothing in exact
    arithmetic (sum_k grad q_nk = 0) and keeps the sum from cancelling large terms.
    """

    name = "indecater"
    unbiased = True

    def __init__(self, n_samples: int = 1, name: str | None = None, optim: dict | None = None):
        super().__init__(name, optim)
        self.n_samples = check_integer("estimator.n_samples", n_samples)

    def evaluations(self) -> int:
        return self.n_samples * self.n_vars * self.n_classes

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        batch, n_vars, n_classes = logits.shape
        s = self.n_samples
        z = sample_categorical(logits, (s,))  # (S, B, N, K)
        # z^{s,n,k}: sample s with variable n set to class k
        classes = torch.eye(n_classes, dtype=z.dtype, device=z.device)  # (K, K)
        at = torch.eye(n_vars, dtype=torch.bool, device=z.device)[:, None, None, :, None]  # (N, 1, 1, N, 1)
        varied = torch.where(at, classes[None, :, None, None, :], z[:, None, None])  # (S, N, K, B, N, K)
        values = objective(varied.reshape(-1, batch, n_vars, n_classes)).reshape(s, n_vars, n_classes, batch)
        # f(z^s): the entry of variable 0 at its sampled class
        sampled_class = z[:, :, 0].argmax(-1)  # (S, B)
        loss = values[:, 0].gather(1, sampled_class[:, None]).squeeze(1)  # (S, B)
        signal = values.detach().permute(0, 3, 1, 2)  # (S, B, N, K)
        signal = (signal - signal.mean(-1, keepdim=True)).mean(0)  # (B, N, K)
        probabilities = torch.softmax(logits.float(), dim=-1)  # (B, N, K)
        surrogate = loss.mean(0) + (probabilities * signal).sum((-1, -2))
        return Estimate(loss=loss.mean(0), surrogate=surrogate, z=z[0] if s == 1 else z)


class DoubleControlVariate(MultiSampleEstimator):
    """Double control variates (Titsias & Shi 2022) for Bernoulli latents: RLOO's leave-one-out baseline plus a
    second control variate, the first-order Taylor term of f around the mean theta = sigmoid(phi), with the slope
    at theta replaced by the leave-one-out mean of the slopes at the other samples (no extra evaluation):

        G_s = d f / d b at b_s,   g_s = 1/(S-1) sum_{j != s} G_j,   c_s = alpha g_s . (b_s - theta),
        grad_phi = 1/S sum_s [f~_s - 1/(S-1) sum_{j != s} f~_j] (b_s - theta) - alpha G_bar theta (1 - theta),

    with f~_s = f(b_s) + c_s and G_bar = mean_s G_s. The last term is the expectation of the control variate's
    part (g_s is independent of b_s and Cov(b_s) = diag theta(1 - theta)), so the estimator is unbiased for any
    alpha that does not depend on this step's samples; alpha = 0 is RLOO. d f / d b for the one-hot z = (1 - b, b)
    is f'_1 - f'_0. ``alpha`` (a scalar, starting at ``alpha``) is trained, with ``learn``, to minimise the
    batch's sum of squared logit gradients V(alpha) = sum (g_0 + alpha h)^2 relative to RLOO's V(0) (scale-free, as
    REBAR's tuning), in its own parameter group (``optim``). S objective evaluations and one backward pass through
    the objective for the slopes.
    """

    name = "double_cv"
    unbiased = True
    binary_only = True

    def __init__(self, n_samples: int = 4, alpha: float = 0.0, learn: bool = True, name: str | None = None,
                 optim: dict | None = None):
        super().__init__(n_samples, name, optim)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"estimator.alpha must be a finite number, got {alpha!r}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=learn)

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        n = self.n_samples
        z = sample_categorical(logits, (n,))  # (S, B, N, 2)
        loss, slope = value_and_slope(objective, z)  # (S, B), (S, B, N, 2)
        phi = logits[..., 1].float() - logits[..., 0].float()  # (B, N)
        theta = torch.sigmoid(phi.detach())
        score = z[..., 1].float() - theta  # (S, B, N): d log q(b_s) / d phi
        grads = (slope[..., 1] - slope[..., 0]).float()  # (S, B, N): G_s
        others = (grads.sum(0, keepdim=True) - grads) / (n - 1)  # g_s

        def leave_one_out(signal: Tensor) -> Tensor:  # 1/S sum_s [x_s - mean_{j != s} x_j] (b_s - theta)
            return (n / (n - 1) * (signal - signal.mean(0)))[..., None].mul(score).mean(0)

        rloo = leave_one_out(loss.detach().float())  # (B, N)
        second = leave_one_out((others * score).sum(-1)) - grads.mean(0) * theta * (1 - theta)  # per unit alpha
        grad_phi = rloo + self.alpha.detach() * second
        surrogate = loss.mean(0) + (grad_phi * masked_as_zero(phi)).sum(-1)
        if self.alpha.requires_grad and torch.is_grad_enabled():
            variance = (rloo + self.alpha * second).pow(2).sum() / rloo.pow(2).sum().clamp_min(
                torch.finfo(rloo.dtype).tiny)
            surrogate = surrogate + variance  # the same in every element: the batch mean passes it on whole
        return Estimate(loss=loss.mean(0), surrogate=surrogate, z=z)
