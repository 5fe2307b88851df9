"""Estimators against exact gradients computed by enumeration, and their defining properties."""

import math

import pytest
import torch

from catvae.estimators import (GumbelSoftmax, MovingAverageBaseline, NoBaseline, Reinforce, STGumbelSoftmax)
from conftest import exact_expectation

N_VARS, N_CLASSES = 3, 3
DRAWS = 20_000


class ToyObjective:
    """f(z; theta) = (sum_nk w_nk z_nk - theta)^2 + 2 sum_n z_n0: nonlinear in z, with a parameter theta
    of its own (one copy per example, so per-draw gradients come from one backward pass) to test the
    pathwise (decoder-like) part of the gradient too."""

    def __init__(self, batch: int = 1):
        generator = torch.Generator().manual_seed(123)
        self.w = torch.randn(N_VARS, N_CLASSES, generator=generator)
        self.theta = torch.full((batch,), 0.7, requires_grad=True)

    def __call__(self, z):
        return ((z * self.w).sum((-1, -2)) - self.theta) ** 2 + 2 * z[..., 0].sum(-1)


def toy_logits(batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(1, N_VARS, N_CLASSES, generator=generator).expand(batch, -1, -1).clone()


def exact_gradients(logits: torch.Tensor):
    """d E_q[f] / d (logits, theta) for one example, by enumeration of the K^N configurations."""
    objective = ToyObjective(1)
    logits = logits[:1].clone().requires_grad_(True)
    value = exact_expectation(logits, objective).sum()
    grad_logits, grad_theta = torch.autograd.grad(value, (logits, objective.theta))
    return grad_logits[0], grad_theta[0]


def estimated_gradients(estimator, draws: int = DRAWS):
    """``draws`` independent single-sample estimates from one call (the example repeated along B):
    per-draw gradients of the logits (draws, N, K) and of theta (draws,)."""
    objective = ToyObjective(draws)
    batch = toy_logits(draws).requires_grad_(True)
    estimate = estimator(batch, objective)
    return torch.autograd.grad(estimate.surrogate.sum(), (batch, objective.theta))


def z_scores(samples: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(mean - exact) / standard error, per coordinate."""
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    return (samples.mean(0) - exact) / standard_error


def warmed_up_baseline() -> MovingAverageBaseline:
    baseline = MovingAverageBaseline(decay=0.9)
    baseline.update(torch.full((10,), 5.0))
    return baseline


@pytest.mark.parametrize("baseline", [NoBaseline(), MovingAverageBaseline(0.99), warmed_up_baseline()],
                         ids=["none", "moving_average_cold", "moving_average_warm"])
def test_reinforce_is_unbiased(baseline):
    torch.manual_seed(0)
    exact_logits, exact_theta = exact_gradients(toy_logits())
    estimator = Reinforce(baseline=baseline).eval()  # eval: the baseline stays fixed during the draws
    logit_grads, theta_grads = estimated_gradients(estimator)
    assert z_scores(logit_grads, exact_logits).abs().max() < 4.5
    assert z_scores(theta_grads, exact_theta).abs() < 4.5
    # The test has power: a sign error in the score term, or dropping it, fails by a wide margin.
    assert z_scores(-logit_grads, exact_logits).abs().max() > 20
    assert z_scores(torch.zeros_like(logit_grads) + 1e-3 * torch.randn_like(logit_grads), exact_logits).abs().max() > 20


def test_moving_average_baseline_reduces_variance_and_tracks_the_mean():
    torch.manual_seed(1)
    plain, _ = estimated_gradients(Reinforce(NoBaseline()).eval(), draws=5000)
    baseline = MovingAverageBaseline(decay=0.9)
    estimator = Reinforce(baseline).train()
    for _ in range(50):
        estimator(toy_logits(500), ToyObjective(500))
    expected_f = exact_expectation(toy_logits(), ToyObjective()).item()
    assert baseline(torch.zeros(1)).item() == pytest.approx(expected_f, rel=0.05)
    centred, _ = estimated_gradients(estimator.eval(), draws=5000)
    assert centred.var(0).sum() < 0.5 * plain.var(0).sum()


def test_moving_average_baseline_is_bias_corrected_and_uses_only_past_values():
    baseline = MovingAverageBaseline(decay=0.5)
    assert baseline(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    baseline.update(torch.tensor([4.0, 6.0]))
    assert baseline(torch.zeros(2)).tolist() == [5.0, 5.0]  # m = 2.5, w = 0.5
    baseline.update(torch.tensor([11.0]))
    assert baseline(torch.zeros(1)).item() == pytest.approx((0.25 * 5 + 0.5 * 11) / 0.75)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2.0])
def test_moving_average_rejects_bad_decay(decay):
    with pytest.raises(ValueError, match=f"decay must be in \\[0, 1\\), got {decay!r}"):
        MovingAverageBaseline(decay)


def test_gumbel_softmax_returns_relaxed_samples_and_pathwise_surrogate():
    torch.manual_seed(2)
    objective, logits = ToyObjective(64), toy_logits(64)
    estimate = GumbelSoftmax(tau=0.5)(logits, objective)
    assert estimate.z.shape == (64, N_VARS, N_CLASSES)
    torch.testing.assert_close(estimate.z.sum(-1), torch.ones(64, N_VARS))
    assert not ((estimate.z == 0) | (estimate.z == 1)).all()
    assert estimate.surrogate is estimate.loss


def test_st_gumbel_softmax_forward_is_one_hot():
    torch.manual_seed(3)
    objective, logits = ToyObjective(64), toy_logits(64)
    estimate = STGumbelSoftmax(tau=0.5)(logits, objective)
    assert set(estimate.z.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(estimate.loss, objective(estimate.z.detach()))


def test_gumbel_softmax_bias_shrinks_as_tau_goes_to_zero_for_a_linear_objective():
    """For f(z) = <w, z>, E_q[f] = sum q_k w_k; the relaxed gradient's bias vanishes as tau -> 0."""
    torch.manual_seed(4)
    weights = torch.tensor([[1.0, -2.0, 0.5]] * N_VARS)
    objective = lambda z: (z * weights).sum((-1, -2))  # noqa: E731
    logits = toy_logits()
    leaf = logits.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(exact_expectation(leaf, objective).sum(), leaf)
    biases = []
    for tau in (2.0, 1.0, 0.5, 0.2):
        batch = logits.expand(100_000, -1, -1).clone().requires_grad_(True)
        (grads,) = torch.autograd.grad(GumbelSoftmax(tau)(batch, objective).surrogate.sum(), batch)
        biases.append((grads.mean(0) - exact[0]).norm().item())
    assert biases == sorted(biases, reverse=True)
    assert biases[-1] < 0.3 * biases[0]


@pytest.mark.parametrize("make", [lambda: GumbelSoftmax(0.5), lambda: STGumbelSoftmax(0.5),
                                  lambda: Reinforce(NoBaseline()), lambda: Reinforce(MovingAverageBaseline())],
                         ids=["gumbel_softmax", "st_gumbel_softmax", "reinforce_none", "reinforce_ema"])
def test_estimators_are_finite_for_extreme_and_masked_logits(make):
    torch.manual_seed(5)
    logits = torch.randn(16, N_VARS, N_CLASSES) * 1e4
    logits[:, :, 1] = -math.inf
    logits.requires_grad_(True)
    estimate = make()(logits, ToyObjective(16))
    assert torch.isfinite(estimate.loss).all() and torch.isfinite(estimate.surrogate).all()
    estimate.surrogate.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (estimate.z[..., 1] == 0).all()


@pytest.mark.parametrize("tau", [0.0, -0.5, math.inf, math.nan])
def test_relaxed_estimators_reject_bad_temperature(tau):
    with pytest.raises(ValueError, match=r"estimator\.tau must be a positive finite number"):
        GumbelSoftmax(tau=tau)
    estimator = STGumbelSoftmax(1.0)
    with pytest.raises(ValueError, match=repr(tau)):
        estimator.tau = tau


def test_estimators_reject_logits_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, N, K\) with K >= 2, got \(4, 3, 1\)"):
        Reinforce()(torch.zeros(4, 3, 1), lambda z: z.sum((-1, -2)))


def test_baseline_state_survives_a_checkpoint_round_trip():
    estimator = Reinforce(MovingAverageBaseline(0.9)).train()
    estimator(toy_logits(32), ToyObjective(32))
    restored = Reinforce(MovingAverageBaseline(0.9))
    restored.load_state_dict(estimator.state_dict())
    assert torch.equal(restored.baseline.mean, estimator.baseline.mean)
    assert torch.equal(restored.baseline.weight, estimator.baseline.weight)
    assert set(estimator.state_dict()) == {"baseline.mean", "baseline.weight"}


def test_name_can_be_overridden_for_logs():
    assert Reinforce().name == "reinforce"
    assert Reinforce(NoBaseline(), name="reinforce_plain").name == "reinforce_plain"
    assert STGumbelSoftmax().name == "st_gumbel_softmax" and GumbelSoftmax().name == "gumbel_softmax"
