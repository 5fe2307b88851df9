"""Gumbel noise, categorical sampling and the Gumbel-Softmax relaxation, as pure functions.

Everything here is numerically safe for the inputs that break naive code:
masked classes (``-inf`` logits), huge finite logits, float16/bfloat16 logits, and a uniform
draw of exactly 0. Noise and softmaxes are computed in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor


def check_temperature(tau: float | Tensor, name: str = "tau") -> None:
    """Raise ``ValueError`` unless ``tau`` is a positive finite number.

    Tensors are not inspected (that would force a device-to-host sync); they are the caller's
    responsibility, e.g. a schedule that already validated the values it produces.
    """
    if isinstance(tau, Tensor):
        return
    if isinstance(tau, bool) or not isinstance(tau, Real) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"{name} must be a positive finite number (0 < {name} < inf), got {tau!r}")


def gumbel_noise(shape: torch.Size | tuple[int, ...], device: torch.device | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel(0, 1) noise in float32: g = -log(-log u), u ~ U[0, 1).

    ``u`` is clamped to the smallest positive float32 so that a draw of exactly 0 gives a finite
    g = -log(-log(tiny)) ~ -4.47 instead of -inf; u < 1 always, so -log u > 0 and g < inf.
    """
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp_min(tiny)))


def perturbed_logits(logits: Tensor, sample_shape: tuple[int, ...] = (),
                     generator: torch.Generator | None = None) -> Tensor:
    """logits + Gumbel noise in float32, with extra leading ``sample_shape`` dims: (*S, ..., K).

    Masked classes stay at -inf (``-inf + g = -inf``), so they are never selected.
    """
    shape = tuple(sample_shape) + tuple(logits.shape)
    return logits.float() + gumbel_noise(shape, logits.device, generator)  # (*S, ..., K)


def one_hot_argmax(scores: Tensor, dim: int = -1) -> Tensor:
    """One-hot vector of the argmax of ``scores`` along ``dim`` (same shape and dtype as scores)."""
    index = scores.argmax(dim=dim, keepdim=True)
    return torch.zeros_like(scores).scatter_(dim, index, 1.0)


def sample_categorical(logits: Tensor, sample_shape: tuple[int, ...] = (),
                       generator: torch.Generator | None = None) -> Tensor:
    """One-hot samples z ~ Cat(softmax(logits)) by the Gumbel-max trick (Jang et al. 2017, Eq. 1):
    z = one_hot(argmax_k (logits_k + g_k)). Shape (*sample_shape, ..., K), dtype of ``logits``,
    no gradient.
    """
    with torch.no_grad():
        return one_hot_argmax(perturbed_logits(logits, sample_shape, generator)).to(logits.dtype)


def sample_categorical_by_inversion(logits: Tensor, sample_shape: tuple[int, ...] = (),
                                    generator: torch.Generator | None = None) -> Tensor:
    """One-hot samples z ~ Cat(softmax(logits)) by inverting the CDF: with u ~ U[0, 1) and
    F_k = (p_1 + ... + p_k) / (p_1 + ... + p_K), z = one_hot(#{k < K : F_k <= u}). Shape
    (*sample_shape, ..., K), dtype of ``logits``, no gradient.

    The same distribution as :func:`sample_categorical` from one uniform per variable instead of K Gumbel
    draws and an argmax; evaluation, where the draws are many, uses it. Training keeps Gumbel-max, whose
    noise a seed shares with :func:`gumbel_softmax`, so that the estimators' random streams, and the runs
    of the full-length campaign, stay those of earlier commits.
    The classes are moved to the leading dim first, because torch's CPU reductions over a short last dim
    (K = 2 in a sigmoid belief net) are several times slower than over a leading one. F_K = 1 exactly (a
    float divided by itself), and a class of probability 0 repeats its predecessor's F, so it is never drawn.
    For K = 2, F_1 = sigmoid(l_1 - l_2) directly, without the softmax and the sums
    (:func:`sample_two_classes_by_inversion`; docs/performance.md).
    """
    with torch.no_grad():
        n_classes, batch_shape = logits.shape[-1], logits.shape[:-1]
        if n_classes == 2:
            second = sample_two_classes_by_inversion(logits[..., 0].float() - logits[..., 1].float(), sample_shape,
                                                     generator).to(logits.dtype)  # (*S, ...)
            return torch.stack((1 - second, second), dim=-1)
        cdf = logits.float().movedim(-1, 0).contiguous().softmax(0).cumsum(0)  # (K, ...)
        cdf = (cdf[:-1] / cdf[-1:]).view(n_classes - 1, *(1,) * len(sample_shape), *batch_shape)
        u = torch.rand(tuple(sample_shape) + tuple(batch_shape), device=logits.device, generator=generator)
        index = (cdf <= u).sum(0)  # (*S, ...)
        classes = torch.arange(n_classes, device=logits.device)
        return (index.unsqueeze(-1) == classes).to(logits.dtype)


def sample_two_classes_by_inversion(logit_difference: Tensor, sample_shape: tuple[int, ...] = (),
                                    generator: torch.Generator | None = None) -> Tensor:
    """Indicators b = [sigmoid(d) <= u] of the second class of K = 2, from d = l_1 - l_2 and u ~ U[0, 1):
    P(b = 1) = 1 - sigmoid(d) = p_2. Shape (*sample_shape, ...), float 0/1, no gradient.

    :func:`sample_categorical_by_inversion` draws K = 2 through it, with the same uniforms, so a model that
    evaluates on indicators instead of one-hot pairs (:class:`catvae.models.sbn.StructuredPredictionSBN`)
    gets the one-hot path's draws.
    """
    with torch.no_grad():
        first_cdf = torch.sigmoid(logit_difference.float())  # (...)
        u = torch.rand(tuple(sample_shape) + tuple(first_cdf.shape), device=first_cdf.device, generator=generator)
        return (first_cdf <= u).float()


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Value of ``hard`` in the forward pass, gradient of ``soft`` in the backward pass."""
    return hard + (soft - soft.detach())


def gumbel_softmax(logits: Tensor, tau: float | Tensor = 1.0, hard: bool = False, dim: int = -1,
                   sample_shape: tuple[int, ...] = (),
                   generator: torch.Generator | None = None) -> Tensor:
    """Gumbel-Softmax sample (Jang et al. 2017, Eq. 2): y_k = softmax((logits_k + g_k) / tau).

    Mirrors ``torch.nn.functional.gumbel_softmax(logits, tau, hard, dim=dim)``. With ``hard=True``
    the forward value is one_hot(argmax y) and the gradient is that of the soft y (Straight-Through
    Gumbel-Softmax, Section 2.2). Optional ``sample_shape`` prepends independent sample dims.
    Safe for -inf (masked) classes, huge logits, low-precision dtypes and a uniform draw of 0;
    every class masked in one distribution is an invalid input and gives NaN.
    """
    check_temperature(tau)
    if dim != -1:
        moved = gumbel_softmax(logits.movedim(dim, -1), tau, hard, -1, sample_shape, generator)
        return moved.movedim(-1, dim)
    scores = perturbed_logits(logits, sample_shape, generator)  # (*S, ..., K)
    # Shift by the (finite for valid input) max before dividing by tau: (l + g) / tau alone overflows
    # for huge logits or small tau. Softmax is shift-invariant, so value and gradient are unchanged.
    scores = scores - scores.amax(dim=-1, keepdim=True).detach()
    y_soft = F.softmax(scores / tau, dim=-1)
    y = straight_through(one_hot_argmax(y_soft.detach()), y_soft) if hard else y_soft
    return y.to(logits.dtype)


def decoupled_gumbel_softmax(logits: Tensor, tau_forward: float | Tensor = 1.0, tau_backward: float | Tensor = 1.0,
                             generator: torch.Generator | None = None) -> Tensor:
    """Decoupled straight-through Gumbel-Softmax (Shah et al. 2024): one Gumbel draw g, the forward value
    one_hot(argmax(logits / tau_forward + g)) (a sample of softmax(logits / tau_forward)) and the gradient of
    softmax(logits / tau_backward + g). The temperatures divide the logits, not the noise (the paper's convention):
    at tau_forward = tau_backward = 1 it is ``gumbel_softmax(logits, 1, hard=True)`` with the same noise, and at
    equal temperatures tau that of ``logits / tau``. Safe for -inf (masked) classes and huge logits.
    """
    check_temperature(tau_forward, "tau_forward")
    check_temperature(tau_backward, "tau_backward")
    noise = gumbel_noise(logits.shape, logits.device, generator)
    logits = logits.float()
    hard = one_hot_argmax(logits.detach() / tau_forward + noise)
    scores = logits / tau_backward + noise
    soft = F.softmax(scores - scores.amax(dim=-1, keepdim=True).detach(), dim=-1)
    return straight_through(hard, soft)


def categorical_log_prob(logits: Tensor, z: Tensor) -> Tensor:
    """log q(z) = sum_n log softmax(logits_n)[k_n] for one-hot z (..., N, K) -> (...).

    Uses a gather of the selected class, never ``z * log_softmax``, so masked classes
    (log-prob -inf, z = 0) do not produce 0 * -inf = NaN. Broadcasts logits over leading sample
    dims of z.
    """
    log_p = F.log_softmax(logits.float(), dim=-1).expand(z.shape)  # (..., N, K)
    selected = log_p.gather(-1, z.argmax(dim=-1, keepdim=True)).squeeze(-1)  # (..., N)
    return selected.sum(dim=-1)  # (...)


def kl_to_uniform(logits: Tensor) -> Tensor:
    """Analytic KL(q || Uniform(K)) = sum_n sum_k q_nk (log q_nk + log K) for logits (..., N, K) -> (...).

    Classes with q = 0 (masked or underflowed) contribute 0 (0 log 0 = 0), with a zero, not NaN,
    gradient: log q is replaced by 0 there before the product.
    """
    log_q = F.log_softmax(logits.float(), dim=-1)  # (..., N, K)
    q = log_q.exp()
    log_q = torch.where(q > 0, log_q, torch.zeros_like(log_q))
    neg_entropy = (q * log_q).sum(dim=(-1, -2))  # (...)
    return neg_entropy + logits.shape[-2] * math.log(logits.shape[-1])


def conditional_gumbel(logits: Tensor, z: Tensor, sample_shape: tuple[int, ...] = (),
                       generator: torch.Generator | None = None) -> Tensor:
    """Gumbel-perturbed log-probabilities conditioned on their argmax being the one-hot ``z``.

    With l = log_softmax(logits) and v ~ U(0, 1)^K (Tucker et al. 2017, Appendix; Paulus et al. 2021):
        g_b = -log(-log v_b)                              for the selected class b (a Gumbel(0) max),
        g_i = -log(-log(v_i) / p_i - log v_b)            for i != b (truncated below g_b),
    so (l + G | argmax = b) is drawn exactly, and g is differentiable in the logits. The second line
    is evaluated as -logaddexp(log(-log v_i) - l_i, log(-log v_b)), finite-gradient for masked classes
    (l_i = -inf gives g_i = -inf). z may carry extra leading sample dims; ``sample_shape`` prepends more.
    Returns float32 scores of shape (*sample_shape, *z.shape). ``generator``, as for every sampling function here:
    draw from it instead of torch's global generator.
    """
    shape = tuple(sample_shape) + tuple(z.shape)
    tiny = torch.finfo(torch.float32).tiny
    neg_log_v = -torch.log(torch.rand(shape, device=z.device, generator=generator).clamp_min(tiny))  # (*S, ..., K), > 0
    log_p = F.log_softmax(logits.float(), dim=-1)
    is_top = z.expand(shape) > 0.5
    log_top = (neg_log_v.log() * is_top).sum(-1, keepdim=True)  # log(-log v_b), (*S, ..., 1)
    others = -torch.logaddexp(neg_log_v.log() - log_p, log_top)
    return torch.where(is_top, -log_top.expand(shape), others)


def enumerate_one_hot(n_vars: int, n_classes: int, device: torch.device | None = None) -> Tensor:
    """All K^N one-hot configurations of N variables with K classes: (K^N, N, K), float32."""
    grids = torch.meshgrid(*[torch.arange(n_classes, device=device)] * n_vars, indexing="ij")
    classes = torch.stack([g.reshape(-1) for g in grids], dim=-1)  # (K^N, N)
    return F.one_hot(classes, n_classes).float()
