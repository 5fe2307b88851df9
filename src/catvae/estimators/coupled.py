"""Estimators from coupled samples: ARM and DisARM (antithetic pairs; DisARM also for K > 2 through a
stick-breaking coupling) and CARMS (n antithetic samples through a Dirichlet copula; ARMS at K = 2).

Each sample of a coupled set is marginally Cat(softmax(logits)); the coupling makes them negatively
correlated, so differences of their objective values carry the gradient with less variance than independent
samples. All of them evaluate f on the coupled set in one objective call and are unbiased.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from catvae.estimators.base import Estimate, Estimator, Objective, masked_as_zero
from catvae.estimators.score_function import MultiSampleEstimator


def antithetic_pair(phi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """u ~ U(0,1), b = 1[u < sigmoid(phi)], b~ = 1[1 - u < sigmoid(phi)]: both ~ Bernoulli(sigmoid(phi)).
    Returns (u, b, b~), each shaped like phi (B, N)."""
    u = torch.rand_like(phi, dtype=torch.float32)
    p = torch.sigmoid(phi.detach().float())
    return u, (u < p).float(), (1 - u < p).float()


def as_one_hot(bits: Tensor) -> Tensor:
    """(..., N) in {0, 1} -> one-hot (..., N, 2) with class 1 meaning z = 1."""
    return F.one_hot(bits.long(), 2).float()


def pairwise_surrogate(f: Tensor, z: Tensor, weight: Tensor, logits: Tensor) -> Tensor:
    """mean_i f(z_i) + sum_n sg(g_n) . logits_n with the pairwise gradient estimate for the logits

        g_n = 1/(S(S-1)) sum_{i < j} w_ijn (f(z_i) - f(z_j)) (e_{z_in} - e_{z_jn}),

    for f (S, B), the one-hot samples z (S, B, N, K) and weights w (P, B, N) of the P = S(S-1)/2 pairs i < j
    in ``torch.triu_indices`` order. At S = 2: 1/2 w (f(z) - f(z~)) (e_z - e_z~)."""
    n = f.shape[0]
    i, j = torch.triu_indices(n, n, 1, device=f.device)
    signal = weight * (f.detach()[i] - f.detach()[j]).to(weight.dtype)[..., None]  # (P, B, N)
    grad = (signal[..., None] * (z[i] - z[j]).to(weight.dtype)).sum(0) / (n * (n - 1))  # (B, N, K)
    return f.mean(0) + (grad.float() * masked_as_zero(logits).float()).sum((-1, -2))


class BinaryPairEstimator(Estimator):
    """Shared ARM/DisARM shape for K = 2: surrogate = (f(b) + f(b~))/2 + sum_n sg(g_n) phi_n, where g_n is the
    per-variable gradient estimate for phi_n = l_n1 - l_n0 given by :meth:`phi_gradient`."""

    unbiased = True
    binary_only = True

    def evaluations(self) -> int:
        return 2  # the antithetic pair

    def phi_gradient(self, phi: Tensor, u: Tensor, b: Tensor, b_anti: Tensor, f: Tensor, f_anti: Tensor) -> Tensor:
        raise NotImplementedError

    def binary_forward(self, logits: Tensor, objective: Objective) -> Estimate:
        phi = logits[..., 1] - logits[..., 0]  # (B, N)
        u, b, b_anti = antithetic_pair(phi)
        z = as_one_hot(torch.stack([b, b_anti])).to(logits.dtype)  # (2, B, N, 2)
        f_pair = objective(z)  # (2, B)
        grad_phi = self.phi_gradient(phi, u, b, b_anti, f_pair[0].detach(), f_pair[1].detach())  # (B, N)
        surrogate = f_pair.mean(0) + (grad_phi.detach() * phi.float()).sum(-1)
        return Estimate(loss=f_pair.mean(0), surrogate=surrogate, z=z)

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        return self.binary_forward(logits, objective)


class ARM(BinaryPairEstimator):
    """Augment-REINFORCE-merge (Yin & Zhou 2019, Theorem 1), in the antithetic form:
    with b~ = 1[u > sigmoid(-phi)] and b = 1[u < sigmoid(phi)],

        g_phi = (f(b~) - f(b)) (u - 1/2).
    """

    name = "arm"

    def phi_gradient(self, phi, u, b, b_anti, f, f_anti):
        return (f_anti - f)[:, None] * (u - 0.5)


def stick_breaking_pair(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The stick-breaking antithetic pair of Dong, Mnih & Tucker (2021) and its importance weights.

    The classes are put in ascending order of their logits, l'_0 <= ... <= l'_{K-1}, and a sample is the first
    j at which a binary "stop" decision succeeds, with conditional probability sigma_j = sigmoid(alpha_j),
    alpha_j = l'_j - logsumexp(l'_{j+1}, ..., l'_{K-1}) (the last class when none does). Both samples use the
    same uniforms, u_j and 1 - u_j: z stops at j if u_j < sigma_j, z~ if 1 - u_j < sigma_j. Each is exactly
    Cat(softmax(logits)).

    Weight (for z != z~): w = q(z) q(z~) / P(z, z~) under the coupling; with m the earlier of the two stops,

        w = sigmoid(|alpha_m|) prod_{j < m} (1 - sigma_j)^2 / (1 - 2 sigma_j),

    finite because the ascending order keeps sigma_j <= 1/(K - j) <= 1/3 for j < K - 2 (another order gives
    pairs the coupling never draws, and a biased estimator). Returns the one-hot pair (2, B, N, K) and w (B, N).
    """
    order = logits.detach().float().argsort(dim=-1)  # (B, N, K), ascending
    ordered = logits.detach().float().gather(-1, order)
    tail = ordered.flip(-1).logcumsumexp(-1).flip(-1)  # tail[j] = logsumexp(l'_j, ..., l'_{K-1})
    alpha = ordered[..., :-1] - tail[..., 1:]  # (B, N, K-1)
    sigma = torch.sigmoid(alpha)
    u = torch.rand_like(sigma)
    last = torch.ones_like(sigma[..., :1], dtype=torch.bool)
    stops = torch.stack([torch.cat([u < sigma, last], -1), torch.cat([1 - u < sigma, last], -1)])  # (2, B, N, K)
    position = stops.int().argmax(-1)  # (2, B, N): the first stop
    z = F.one_hot(order.expand(2, *order.shape).gather(-1, position[..., None]).squeeze(-1), logits.shape[-1])
    m = position.amin(0).clamp(max=logits.shape[-1] - 2)  # (B, N); clamped only where z = z~ (weight unused)
    # log (1 - sigma_j)^2 / (1 - 2 sigma_j) for j < K - 2, exclusive cumulative sum up to m
    log_factor = 2 * F.logsigmoid(-alpha[..., :-1]) - torch.log1p(-2 * sigma[..., :-1])
    log_prefix = F.pad(log_factor.cumsum(-1), (1, 0))  # (B, N, K-1): sum_{j < m}
    log_weight = log_prefix.gather(-1, m[..., None]) + F.logsigmoid(alpha.abs()).gather(-1, m[..., None])
    return z.to(logits.dtype), log_weight.squeeze(-1).exp()


class DisARM(BinaryPairEstimator):
    """DisARM (Dong, Mnih & Tucker 2020, Eq. 5): ARM with the augmentation integrated out,

        g_phi = 1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigmoid(|phi|),

    never worse in variance than ARM, and zero wherever b = b~. For K > 2: the importance-weighted estimator of
    the stick-breaking coupling (Dong, Mnih & Tucker 2021), g = 1/2 w (f(z) - f(z~)) (e_z - e_z~) with the pair
    and weight of :func:`stick_breaking_pair`, which is the formula above at K = 2 (w = sigmoid(|phi|)). K = 2
    keeps the antithetic pair above (same draws as before K > 2 existed). Two objective evaluations.
    """

    name = "disarm"
    binary_only = False

    def phi_gradient(self, phi, u, b, b_anti, f, f_anti):
        sign = 1 - 2 * b_anti  # (-1)^{b~}
        return 0.5 * (f - f_anti)[:, None] * sign * (b != b_anti).float() * torch.sigmoid(phi.detach().abs().float())

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        if logits.shape[-1] == 2:
            return self.binary_forward(logits, objective)
        z, weight = stick_breaking_pair(logits)
        f_pair = objective(z)  # (2, B)
        return Estimate(loss=f_pair.mean(0), surrogate=pairwise_surrogate(f_pair, z, weight[None], logits), z=z)


def dirichlet_copula(n: int, shape: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """n jointly antithetic uniforms per entry of ``shape`` (Dimitriev & Zhou 2021): d ~ Dirichlet(1, ..., 1)
    (normalised Exp(1) draws), u_i = (1 - d_i)^(n - 1). Each u_i ~ U(0, 1) exactly (d_i ~ Beta(1, n - 1)), and
    sum_i d_i = 1 keeps them apart: no two fall below 2^-(n-1). Returns (n, *shape), float64."""
    e = -torch.log1p(-torch.rand((n, *shape), device=device, dtype=torch.float64))  # Exp(1), in [0, inf)
    d = e / e.sum(0).clamp_min(torch.finfo(torch.float64).tiny)
    return (1 - d) ** (n - 1)


def copula_root(x: Tensor, n: int) -> Tensor:
    """x^(1/(n-1)): :func:`copula_cdf` in terms of these is max(r_x + r_y - 1, 0)^(n-1)."""
    return x ** (1 / (n - 1))


def copula_cdf_of_roots(root_x: Tensor, root_y: Tensor, n: int) -> Tensor:
    return (root_x + root_y - 1).clamp_min(0) ** (n - 1)


def copula_cdf(x: Tensor, y: Tensor, n: int) -> Tensor:
    """P(u_i <= x, u_j <= y) for two of the n uniforms of :func:`dirichlet_copula`:
    max(x^(1/(n-1)) + y^(1/(n-1)) - 1, 0)^(n-1)."""
    return copula_cdf_of_roots(copula_root(x, n), copula_root(y, n), n)


def pair_orderings(n_classes: int) -> Tensor:
    """(K(K-1)/2, K): for each pair a < b, the order a, (the others ascending), b: every pair is at the two ends
    of one order, where the copula can draw both."""
    orders = [[a, *(c for c in range(n_classes) if c not in (a, b)), b]
              for a, b in itertools.combinations(range(n_classes), 2)]
    return torch.tensor(orders)


class CARMS(MultiSampleEstimator):
    """CARMS (Dimitriev & Zhou 2021, the inverse-CDF form "CARMS-I"): S = ``n_samples`` categorical samples per
    variable made jointly antithetic by the Dirichlet copula, and the importance-weighted pairwise estimator

        g = 1/(S(S-1)) sum_{i < j} r(z_i, z_j) (f(z_i) - f(z_j)) (e_{z_i} - e_{z_j}),
        r(a, b) = p_a p_b / P(z_i = a, z_j = b),

    unbiased because E[r(z_i, z_j) h(z_i, z_j)] is the expectation of h under independent draws (pairs with
    z_i = z_j contribute 0). Sampling: per variable one order of the classes, uniform among
    :func:`pair_orderings` and oriented with the less probable end class first (the copula's most antithetic
    tail); the probabilities laid on [0, 1] in that order and z_i the class whose interval holds u_i. The pair
    probability is the copula's rectangle probability averaged over the orders (closed form, float64). With
    independent samples r = 1 and this is RLOO; at K = 2 it is ARMS (Dimitriev & Zhou 2021, ICML), and at S = 2
    (antithetic u, 1 - u) DisARM. S objective evaluations, in one call. Orders are built at ``bind``.
    """

    name = "carms"
    unbiased = True

    def bind(self, n_vars: int, n_classes: int, context_dim: int) -> None:
        super().bind(n_vars, n_classes, context_dim)
        self.register_buffer("orders", pair_orderings(n_classes), persistent=False)  # (M, K)

    def intervals(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Each class's interval (low, high) on [0, 1] under every order, (B, N, M, K) each, with the order
        reversed where its last class is the less probable end."""
        rank = self.orders.argsort(-1)  # (M, K): position of each class
        before = (rank[:, None, :] < rank[:, :, None]).to(p.dtype)  # (M, K class, K other): other comes first
        low = torch.einsum("mac,bnc->bnma", before, p)
        high = low + p[..., None, :]
        ends = p[..., self.orders[:, [0, -1]]]  # (B, N, M, 2): p of the first and the last class
        flip = (ends[..., 1] < ends[..., 0])[..., None]  # (B, N, M, 1)
        low, high = torch.where(flip, 1 - high, low), torch.where(flip, 1 - low, high)
        return low.clamp(0, 1), high.clamp(0, 1)  # rounding may step past [0, 1]; copula_cdf needs it

    def sample(self, low: Tensor, high: Tensor) -> Tensor:
        """One-hot (S, B, N, K) samples: per variable a uniformly chosen order, z_i the class whose interval
        under it holds the copula's u_i (the nearest one where rounding leaves u_i between intervals)."""
        order = torch.randint(len(self.orders), low.shape[:2], device=low.device)  # (B, N)
        pick = order[..., None, None].expand(*low.shape[:2], 1, low.shape[-1])
        low, high = low.gather(-2, pick).squeeze(-2), high.gather(-2, pick).squeeze(-2)  # (B, N, K)
        u = dirichlet_copula(self.n_samples, low.shape[:2], low.device)[..., None]  # (S, B, N, 1)
        gap = (low - u).clamp_min(0) + (u - high).clamp_min(0) + (high <= low).double()  # 0 inside
        return F.one_hot(gap.argmin(-1), low.shape[-1])

    def pair_probability(self, low: Tensor, high: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """P(z_i = a, z_j = b) for classes a, b (P, B, N): the copula's probability of the rectangle of their
        intervals, C(h_a, h_b) + C(l_a, l_b) - C(l_a, h_b) - C(h_a, l_b), averaged over the orders. The bounds' roots
        x^(1/(n-1)) of :func:`copula_cdf` are taken once, before the classes' bounds are gathered."""
        batch, n_vars, n_orders, n_classes = low.shape
        n = self.n_samples
        offset = torch.arange(batch * n_vars, device=low.device).view(batch, n_vars) * n_classes

        def roots(bounds: Tensor) -> Tensor:  # (B * N * K, M): one row per variable and class
            return copula_root(bounds.transpose(-1, -2).reshape(-1, n_orders), n)

        def at(rows: Tensor, cls: Tensor) -> Tensor:  # (P, B, N, M): the rows of class cls
            return rows[(offset + cls).reshape(-1)].view(*cls.shape, n_orders)

        low_roots, high_roots = roots(low), roots(high)
        low_a, high_a, low_b, high_b = at(low_roots, a), at(high_roots, a), at(low_roots, b), at(high_roots, b)
        return (copula_cdf_of_roots(high_a, high_b, n) + copula_cdf_of_roots(low_a, low_b, n)
                - copula_cdf_of_roots(low_a, high_b, n) - copula_cdf_of_roots(high_a, low_b, n)).mean(-1)

    def forward(self, logits: Tensor, objective: Objective, context: Tensor | None = None) -> Estimate:
        self.check_logits(logits)
        p = torch.softmax(logits.detach().double(), dim=-1)  # (B, N, K)
        low, high = self.intervals(p)  # (B, N, M, K)
        z = self.sample(low, high)  # (S, B, N, K)
        f = objective(z.to(logits.dtype))  # (S, B)
        i, j = torch.triu_indices(self.n_samples, self.n_samples, 1, device=p.device)  # the S(S-1)/2 pairs
        a, b = z.argmax(-1)[i], z.argmax(-1)[j]  # (P, B, N)
        p_a = p.expand(len(a), *p.shape).gather(-1, a[..., None]).squeeze(-1)
        p_b = p.expand(len(b), *p.shape).gather(-1, b[..., None]).squeeze(-1)
        joint = self.pair_probability(low, high, a, b).clamp_min(torch.finfo(torch.float64).tiny)
        ratio = torch.where(a != b, p_a * p_b / joint, torch.zeros_like(joint))  # (P, B, N); 0 where a = b
        return Estimate(loss=f.mean(0), surrogate=pairwise_surrogate(f, z, ratio, logits), z=z.to(logits.dtype))
