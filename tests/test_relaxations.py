"""The functional layer: Gumbel-max statistics, soft and straight-through samples, numerics."""

import math

import pytest
import torch
import torch.nn.functional as F

from catvae.relaxations import (categorical_log_prob, conditional_gumbel, decoupled_gumbel_softmax, gumbel_softmax,
                                kl_to_uniform, one_hot_argmax, sample_categorical, sample_categorical_by_inversion)


@pytest.mark.parametrize("sampler", [sample_categorical, sample_categorical_by_inversion])
def test_one_hot_samplers_draw_softmax_frequencies_and_never_a_masked_class(sampler):
    """Both samplers are one-hot draws from softmax(logits), over K = 2, 4 and 5 with a class of probability 0
    first, in the middle and last; the sample dims lead. Tolerance: 4.5 standard errors of each frequency."""
    torch.manual_seed(5)
    inf = math.inf
    for logits in (torch.tensor([[0.3, -1.2], [4.0, 0.0], [-inf, 0.5], [1.0, -inf]]),
                   torch.tensor([[2.0, 0.5, -1.0, 0.0], [-3.0, 1.0, 1.0, 0.2]]),
                   torch.tensor([[-inf, 1.0, -inf, 0.5, -inf], [0.1, -inf, 0.7, 2.0, -inf]])):
        n = 200_000
        z = sampler(logits, (n, 1))  # (n, 1, N, K)
        assert z.shape == (n, 1, *logits.shape) and z.dtype == logits.dtype
        assert torch.equal(z.sum(-1), torch.ones(n, 1, logits.shape[0]))
        p = logits.softmax(-1)
        assert (z.sum((0, 1))[p == 0] == 0).all(), "a class of probability 0 was drawn"
        standard_error = (p * (1 - p) / n).sqrt().clamp_min(1e-12)
        assert ((z.sum((0, 1)) / n - p).abs() / standard_error).max() < 4.5


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_soft_samples_lie_on_the_simplex(tau):
    torch.manual_seed(1)
    y = gumbel_softmax(torch.randn(64, 5, 7), tau=tau)
    assert y.shape == (64, 5, 7)
    assert (y >= 0).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(64, 5))
    assert not ((y == 0) | (y == 1)).all(), "soft samples must not be one-hot"


def test_soft_sample_argmax_is_the_gumbel_max_sample():
    """softmax((l + g) / tau) and argmax(l + g) share the noise: same winner for any tau."""
    logits = torch.randn(1000, 3, 6)
    torch.manual_seed(2)
    soft = gumbel_softmax(logits, tau=0.7)
    torch.manual_seed(2)
    hard = sample_categorical(logits)
    assert torch.equal(F.one_hot(soft.argmax(-1), 6).float(), hard)


def test_straight_through_forward_is_one_hot_with_the_soft_gradient():
    logits = torch.randn(32, 4, 5, requires_grad=True)
    weights = torch.randn(32, 4, 5)
    torch.manual_seed(3)
    y_hard = gumbel_softmax(logits, tau=0.5, hard=True)
    assert set(y_hard.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(y_hard.sum(-1), torch.ones(32, 4))
    (grad_hard,) = torch.autograd.grad((y_hard * weights).sum(), logits)
    torch.manual_seed(3)
    y_soft = gumbel_softmax(logits, tau=0.5, hard=False)
    (grad_soft,) = torch.autograd.grad((y_soft * weights).sum(), logits)
    torch.testing.assert_close(grad_hard, grad_soft)
    assert torch.equal(y_hard.argmax(-1), y_soft.argmax(-1))


def test_dim_argument_mirrors_torch():
    logits = torch.randn(5, 3, 8)  # classes along dim 1
    torch.manual_seed(4)
    y = gumbel_softmax(logits, tau=1.0, hard=True, dim=1)
    torch.testing.assert_close(y.sum(1), torch.ones(5, 8))


def test_expected_soft_sample_approaches_softmax_as_tau_goes_to_zero():
    """E[softmax((l+g)/tau)] -> softmax(l) as tau -> 0 (Gumbel-max); at tau = 10 it is pulled most
    of the way to uniform, keeping the order of the classes."""
    torch.manual_seed(5)
    logits = torch.tensor([math.log(0.15), math.log(0.4), math.log(0.45)])
    p = logits.softmax(-1)
    mean_cold = gumbel_softmax(logits, tau=0.01, sample_shape=(100_000,)).mean(0)
    mean_hot = gumbel_softmax(logits, tau=10.0, sample_shape=(100_000,)).mean(0)
    assert (mean_cold - p).abs().max() < 0.01
    assert (mean_hot - 1 / 3).abs().max() < 0.25 * (p - 1 / 3).abs().max()
    assert torch.equal(mean_hot.argsort(), p.argsort())


@pytest.mark.parametrize("hard", [False, True])
def test_masked_classes_are_never_sampled_and_stay_finite(hard):
    torch.manual_seed(6)
    logits = torch.randn(256, 3, 5)
    logits[..., 1] = -math.inf
    logits[..., 3] = -math.inf
    logits.requires_grad_(True)
    y = gumbel_softmax(logits, tau=0.3, hard=hard)
    assert torch.isfinite(y).all()
    assert (y[..., 1] == 0).all() and (y[..., 3] == 0).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("hard", [False, True])
def test_huge_logits_stay_finite(hard):
    logits = torch.tensor([[1e30, -1e30, 0.0], [3e38, 3e38, -3e38]], requires_grad=True)
    y = gumbel_softmax(logits, tau=0.5, hard=hard)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert y[0].argmax() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hard", [False, True])
def test_low_precision_logits(dtype, hard):
    torch.manual_seed(7)
    logits = (torch.randn(128, 4, 10) * 30).to(dtype)
    logits[..., 0] = -math.inf
    logits.requires_grad_(True)
    y = gumbel_softmax(logits, tau=0.1, hard=hard)
    assert y.dtype == dtype
    assert torch.isfinite(y).all() and (y[..., 0] == 0).all()
    torch.testing.assert_close(y.float().sum(-1), torch.ones(128, 4), atol=1e-2, rtol=0)
    y.float().sum().backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_uniform_draw_of_exactly_zero_is_safe(monkeypatch):
    """u = 0 would give g = -inf (and NaN softmaxes) in a naive -log(-log u)."""
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros_like(real_rand(*a, **k)))
    logits = torch.randn(4, 2, 3, requires_grad=True)
    for hard in (False, True):
        y = gumbel_softmax(logits, tau=1.0, hard=hard)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.sum(-1), torch.ones(4, 2))


@pytest.mark.parametrize("tau", [0, 0.0, -1.0, math.inf, math.nan, "1.0", None, True])
def test_bad_temperatures_are_rejected_with_the_value(tau):
    with pytest.raises(ValueError, match="tau must be a positive finite number") as info:
        gumbel_softmax(torch.zeros(2, 3), tau=tau)
    assert repr(tau) in str(info.value)


def test_categorical_log_prob_matches_torch_distributions_and_survives_masks():
    torch.manual_seed(8)
    logits = torch.randn(50, 6, 4)
    logits[:, :, 2] = -math.inf
    z = sample_categorical(logits, (3,))  # (3, 50, 6, 4)
    expected = torch.distributions.Categorical(logits=logits).log_prob(z.argmax(-1)).sum(-1)
    torch.testing.assert_close(categorical_log_prob(logits, z), expected)
    logits.requires_grad_(True)
    categorical_log_prob(logits, z).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_kl_to_uniform_matches_torch_distributions_and_has_finite_masked_gradients():
    torch.manual_seed(9)
    logits = torch.randn(10, 20, 10)
    q = torch.distributions.Categorical(logits=logits)
    prior = torch.distributions.Categorical(logits=torch.zeros(10))
    torch.testing.assert_close(kl_to_uniform(logits), torch.distributions.kl_divergence(q, prior).sum(-1))
    masked = logits.clone()
    masked[..., :3] = -math.inf
    masked.requires_grad_(True)
    kl = kl_to_uniform(masked)
    assert torch.isfinite(kl).all()
    kl.sum().backward()
    assert torch.isfinite(masked.grad).all()


SAMPLERS = {
    "gumbel_softmax": lambda logits, g: gumbel_softmax(logits, 0.5, generator=g),
    "gumbel_softmax_hard": lambda logits, g: gumbel_softmax(logits, 0.5, hard=True, sample_shape=(3,), generator=g),
    "sample_categorical": lambda logits, g: sample_categorical(logits, (4,), generator=g),
    "sample_categorical_by_inversion": lambda logits, g: sample_categorical_by_inversion(logits, (4,), generator=g),
    "conditional_gumbel": lambda logits, g: conditional_gumbel(logits, one_hot_argmax(logits), (2,), generator=g),
    "decoupled_gumbel_softmax": lambda logits, g: decoupled_gumbel_softmax(logits, 0.7, 0.4, generator=g),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_seeded_generator_reproduces_the_draws_and_leaves_the_global_stream_alone(name):
    """The same seed gives the same draws whatever the global generator did in between, the global stream is not
    advanced by them, and another seed gives other draws (unlike torch.nn.functional.gumbel_softmax, which has no
    generator argument)."""
    for logits in (torch.randn(5, 4, 6), torch.randn(5, 4, 2)):
        torch.manual_seed(0)
        first = SAMPLERS[name](logits, torch.Generator().manual_seed(17))
        after_first = torch.rand(3)
        torch.manual_seed(1)
        torch.rand(100)
        second = SAMPLERS[name](logits, torch.Generator().manual_seed(17))
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.manual_seed(0)
        torch.testing.assert_close(torch.rand(3), after_first, rtol=0, atol=0)  # the global stream did not move
        other = SAMPLERS[name](logits, torch.Generator().manual_seed(18))
        assert not torch.equal(first, other)
