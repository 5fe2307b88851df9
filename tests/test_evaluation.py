"""The importance-weighted bound against log p(x) computed exactly by enumeration."""

import math

import pytest
import torch

from catvae.evaluation import importance_weighted_nll
from catvae.relaxations import categorical_log_prob
from conftest import all_one_hot

N_VARS, N_CLASSES, BATCH = 2, 3, 4


def toy_model():
    """log p(x, z) for 4 fixed 'images' x and every z: a table (C=9 configs, B=4), plus exact log p(x)."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(N_CLASSES ** N_VARS, BATCH, generator=generator) * 2 - 5  # log p(x_b, z_c)
    configs = all_one_hot(N_VARS, N_CLASSES)  # (C, N, K)

    def log_joint(z):  # z (S, B, N, K) -> (S, B)
        index = (z.argmax(-1) * torch.tensor([N_CLASSES, 1])).sum(-1)  # (S, B) config id
        return table.gather(0, index)

    assert torch.equal(configs.argmax(-1) @ torch.tensor([N_CLASSES, 1]), torch.arange(len(configs)))
    return log_joint, table.logsumexp(0), table


def test_exact_posterior_proposal_gives_exact_log_likelihood_for_any_sample_count():
    """If q(z|x) = p(z|x), every weight p(x,z)/q(z|x) equals p(x): the bound is exact for any S.
    Build such a model: log p(x_b, z) = log q(z|x_b) + log p(x_b) with arbitrary log p(x_b)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(BATCH, N_VARS, N_CLASSES, generator=generator)
    log_px = torch.randn(BATCH, generator=generator) - 50
    log_joint = lambda z: categorical_log_prob(logits, z) + log_px  # noqa: E731
    torch.manual_seed(0)
    for n_samples, chunk_size in ((1, 1), (7, 3), (100, 100), (1000, 64)):
        torch.testing.assert_close(importance_weighted_nll(logits, log_joint, n_samples, chunk_size), -log_px)


def test_bound_converges_to_the_exact_nll_and_is_above_it():
    """With S = 20,000 draws the bound is within 4.5 standard errors of -log p(x), the standard error of
    log (1/S) sum_s w_s being sqrt(Var_q[w] / S) / p(x) by the delta method, Var_q[w] by enumeration."""
    log_joint, log_px, table = toy_model()
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(BATCH, N_VARS, N_CLASSES, generator=generator)  # a poor proposal
    n_samples = 20_000
    log_q = categorical_log_prob(logits, all_one_hot(N_VARS, N_CLASSES).unsqueeze(1).expand(-1, BATCH, -1, -1))
    relative_variance = (log_q.exp() * (2 * (table - log_q - log_px)).exp()).sum(0) - 1  # Var_q[w] / p(x)^2, (B,)
    standard_error = (relative_variance / n_samples).sqrt()
    assert (standard_error > 0.005).all() and (standard_error < 0.05).all(), standard_error
    torch.manual_seed(1)
    few = torch.stack([importance_weighted_nll(logits, log_joint, 2, 2) for _ in range(200)]).mean(0)
    many = importance_weighted_nll(logits, log_joint, n_samples, chunk_size=1000)
    assert (few > -log_px + 0.05).all(), "with S = 2 the bound is loose on average"
    assert ((many + log_px).abs() < 4.5 * standard_error).all(), (many + log_px, standard_error)
    assert few.mean() > many.mean()


def test_chunking_handles_a_remainder_and_rejects_bad_sizes():
    log_joint, log_px, _ = toy_model()
    logits = torch.zeros(BATCH, N_VARS, N_CLASSES)
    torch.manual_seed(2)
    bound = importance_weighted_nll(logits, log_joint, 250, chunk_size=100)
    assert bound.shape == (BATCH,) and torch.isfinite(bound).all()
    with pytest.raises(ValueError, match="n_samples and chunk_size must be >= 1"):
        importance_weighted_nll(logits, log_joint, 0)
    assert math.isfinite(bound.sum().item())
