"""Gradient diagnostics: the statistics by hand, exact/unbiased/biased estimators on a toy VAE whose exact
gradient is enumerable, the logged keys, and no effect on the training run."""

import copy
import json
import math

import pytest
import torch
from hydra.utils import instantiate

from catvae.diagnostics import GradientDiagnostics, Reference, gradient_draws, gradient_statistics, reference_of
from catvae.estimators import RLOO, Exact, GumbelSoftmax, MovingAverageBaseline, NoBaseline, Reinforce
from catvae.run import run
from conftest import compose_config
from test_training import column, read_metrics


def test_statistics_by_hand():
    draws = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    stats = gradient_statistics(draws, Reference(torch.tensor([2.0, 0.0], dtype=torch.float64), 0.0))
    # mean (2, 0); sample variances (2, 0) -> total 2; both draws point along the reference
    assert stats == pytest.approx({"var": 2.0, "snr": 2 / math.sqrt(2), "cos": 1.0, "bias": 0.0, "bias_se": 1.0})
    noisy = reference_of(torch.tensor([[0.0, 1.0], [0.0, 3.0]], dtype=torch.float64))
    assert noisy.variance_of_mean == pytest.approx(1.0)  # tr Cov / M = 2 / 2
    assert gradient_statistics(draws, noisy)["bias_se"] == pytest.approx(math.sqrt(2 / 2 + 1.0))
    with pytest.raises(ValueError, match="at least 2 draws, got 1"):
        gradient_statistics(draws[:1], noisy)


@pytest.fixture(scope="module")
def toy_vae():
    """A small VAE with 3 variables of 3 classes (27 configurations: the reference is exact) and a batch."""
    cfg = compose_config(["data=synthetic", "model.n_vars=3", "model.n_classes=3", "model.hidden_sizes=[16]"])
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, estimator=Reinforce(NoBaseline()), image_shape=list(datamodule.image_shape))
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((24, 64), 0.3))
    return model, x


def measured(model, x, estimator, n_draws=64):
    torch.manual_seed(1)
    estimator.bind(model.n_vars, model.n_classes, model.estimator_context_dim)
    params, _ = gradient_draws(model, x, Exact(), 1)
    return gradient_statistics(gradient_draws(model, x, estimator, n_draws)[0], reference_of(params))


def test_exact_has_zero_bias_and_variance(toy_vae):
    stats = measured(*toy_vae, Exact(), n_draws=3)
    assert stats["var"] < 1e-12 and stats["bias"] < 1e-6 and stats["cos"] == pytest.approx(1.0)


@pytest.mark.parametrize("make", [lambda: Reinforce(NoBaseline()), lambda: RLOO(2), lambda: RLOO(8)],
                         ids=["reinforce", "rloo_2", "rloo_8"])
def test_unbiased_estimators_have_bias_within_its_standard_error(toy_vae, make):
    stats = measured(*toy_vae, make())
    # for an unbiased estimator bias ~ bias_se (the norm of the mean's noise); a real bias is many times it
    assert stats["bias"] < 2 * stats["bias_se"]


def test_variance_normalised_estimators_rescale_the_whole_encoder_gradient(toy_vae):
    """With an analytic KL, dividing only the score term by s would turn the gradient towards the prior; the model
    divides the KL's gradient by the same s, so s times the encoder's gradient is unbiased."""
    model = copy.deepcopy(toy_vae[0])
    with torch.no_grad():
        model.decoder[-1].bias.fill_(3.0)  # p(x_d = 1) ~ 0.95: white and black images get very different losses
    x = torch.cat([torch.ones(12, 64), torch.zeros(12, 64)])  # so the running std of the signal is well above 1
    estimator = Reinforce(MovingAverageBaseline(0.9, normalise_variance=True))
    estimator.bind(model.n_vars, model.n_classes, model.estimator_context_dim)
    for _ in range(20):  # warm the running mean and variance
        model.nelbo_estimate(x, estimator)
    estimator.eval()
    assert float(estimator.baseline.scale()) > 1.5  # a real rescaling is exercised
    stats = measured(model, x, estimator)
    assert stats["bias"] < 2 * stats["bias_se"]  # without the KL rescaled, about 7 times bias_se


def test_a_biased_estimator_is_detected(toy_vae):
    stats = measured(*toy_vae, GumbelSoftmax(tau=2.0))
    assert stats["bias"] > 5 * stats["bias_se"]


def test_variance_drops_with_rloo_samples(toy_vae):
    variances = [measured(*toy_vae, RLOO(s))["var"] for s in (2, 4, 16)]
    assert variances[0] > 1.5 * variances[1] > 1.5 * 1.5 * variances[2]


def diagnosed(tmp_path, *extra):
    return compose_config(["data=synthetic", "model.n_vars=3", "model.n_classes=3", "model.hidden_sizes=[16]",
                           "model.iw_samples=10", "trainer=cpu", "trainer.max_epochs=2", "logger=csv",
                           "trainer.enable_progress_bar=false", "estimator=reinforce", *extra], tmp_path)


def test_the_callback_logs_every_key_and_leaves_the_run_unchanged(tmp_path):
    plain = run(diagnosed(tmp_path / "plain"))
    cfg = diagnosed(tmp_path / "diag", "callbacks=grad_diagnostics", "callbacks.grad_diagnostics.every_n_steps=4",
                    "callbacks.grad_diagnostics.n_draws=4", "+estimator@callbacks.grad_diagnostics.panel.rloo=rloo")
    with_diagnostics = run(cfg)
    assert with_diagnostics["metrics"] == plain["metrics"]  # its own random stream: training is untouched
    rows = read_metrics(tmp_path / "diag")
    for name in ("reinforce", "rloo"):
        for stat in ("var", "snr", "cos", "bias", "bias_se"):
            for key in (f"grad/{name}/{stat}", f"grad/{name}/logits_{stat}"):
                values = column(rows, key)
                assert len(values) == 4 and all(map(math.isfinite, values)), key  # steps 0, 4, 8, 12
    assert column(rows, "grad/reference/var") == [0.0] * 4  # exact reference: 27 configurations
    for name, evaluations in (("reinforce", 1), ("rloo", 4)):  # the equal-work variance: var x evaluations
        assert column(rows, f"grad/{name}/var_x_evals") == pytest.approx(
            [evaluations * v for v in column(rows, f"grad/{name}/var")])
    assert json.loads((tmp_path / "diag" / "results.json").read_text())["global_step"] == 16


@pytest.mark.parametrize("key, value", [("n_draws", 1), ("every_n_steps", 0), ("reference_samples", 1)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=rf"callbacks.grad_diagnostics.{key} must be an integer >= \d+, got {value}"):
        GradientDiagnostics(**{key: value})
