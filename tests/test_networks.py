"""bernoulli_nll: the in-place evaluation path and the autograd path against softplus(l) - x l in float64."""

import pytest
import torch
import torch.nn.functional as F

from catvae.models.networks import bernoulli_nll


def exact_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    logits, x = logits.double(), x.double()
    return (F.softplus(logits) - x * logits).sum(-1)


@pytest.fixture
def logits_and_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (S, B, D) from -120 to 120 with exact zeros and tiny values; pixels (B, D) binary and grey."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 64, generator=generator) * 30
    logits[0, 0, :8] = torch.tensor([0.0, 1e-6, -1e-6, 17.0, -17.0, 90.0, -90.0, 120.0])
    pixels = (torch.rand(4, 64, generator=generator) < 0.4).float()
    pixels[3] = torch.rand(64, generator=generator)  # grey levels: the same formula, a cross-entropy
    return logits, pixels


def test_evaluation_path_matches_the_float64_formula(logits_and_pixels):
    logits, pixels = logits_and_pixels
    kept = logits.clone()
    with torch.no_grad():
        nll = bernoulli_nll(logits, pixels)
    assert nll.shape == (5, 4) and nll.dtype == torch.float32
    torch.testing.assert_close(nll.double(), exact_nll(logits, pixels), rtol=1e-6, atol=1e-5)
    assert torch.equal(logits, kept)  # the in-place sum works on its own buffers


def test_evaluation_path_equals_torchs_bce_up_to_rounding(logits_and_pixels):
    logits, pixels = logits_and_pixels
    fused = F.binary_cross_entropy_with_logits(logits, pixels.expand_as(logits), reduction="none").sum(-1)
    torch.testing.assert_close(bernoulli_nll(logits, pixels), fused, rtol=1e-6, atol=1e-5)


def test_autograd_path_gives_the_gradient_sigmoid_minus_x(logits_and_pixels):
    logits, pixels = logits_and_pixels
    logits.requires_grad_(True)
    nll = bernoulli_nll(logits, pixels)
    torch.testing.assert_close(nll.double(), exact_nll(logits.detach(), pixels), rtol=1e-6, atol=1e-5)
    nll.sum().backward()
    torch.testing.assert_close(logits.grad, torch.sigmoid(logits.detach()) - pixels.expand_as(logits))
