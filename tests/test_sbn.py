"""The structured-prediction SBN (Jang et al. 2017, 4.1): estimators chained through stochastic layers,
checked against the expectation over every configuration of both layers, and its prediction bound."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from catvae.estimators import Exact, GumbelSoftmax, Reinforce, RLOO, StraightThrough
from catvae.models.sbn import StructuredPredictionSBN
from catvae.run import run
from conftest import ROOT, all_one_hot, compose_config

N_VARS, N_CLASSES, IMAGE = 2, 3, (1, 4, 3)  # 9 configurations per layer, upper/lower halves of 6 pixels


def make_sbn(estimator, seed=1, n_vars=N_VARS, n_classes=N_CLASSES, **kwargs) -> StructuredPredictionSBN:
    torch.manual_seed(seed)
    return StructuredPredictionSBN(estimator, torch.optim.SGD, image_shape=IMAGE, n_vars=n_vars,
                                   n_classes=n_classes, **kwargs)


@pytest.fixture(scope="module")
def images():
    return torch.bernoulli(torch.full((5, *IMAGE), 0.5), generator=torch.Generator().manual_seed(0))


def enumerated_terms(model, images):
    """(p(h1, h2 | x_upper) (B, C, C), -log p(x_lower | h2) (B, C)) over all C configurations of each layer,
    written out layer by layer, independently of the model's estimator chain."""
    x_upper, x_lower = model.halves(images)
    configs = all_one_hot(N_VARS, model.n_classes)  # (C, N, K)
    log_p1 = (configs * torch.log_softmax(model.layer_logits(0, x_upper), -1)[:, None]).sum((-1, -2))  # (B, C)
    log_p2 = (configs * torch.log_softmax(model.layer_logits(1, configs.flatten(1)), -1)[:, None]).sum((-1, -2))
    nll = model.lower_nll(configs[:, None].expand(-1, len(images), -1, -1), x_lower).T  # (B, C)
    return (log_p1[:, :, None] + log_p2[None]).exp(), nll  # (B, C, C) over (h1, h2), (B, C) over h2


def expected_loss(model, images):
    joint, nll = enumerated_terms(model, images)
    return (joint * nll[:, None, :]).sum()


def flat_grad(value, model):
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(model.parameters()))])


def test_exact_chained_through_two_layers_is_the_enumerated_gradient(images):
    model = make_sbn(Exact())
    x_upper, x_lower = model.halves(images)
    estimate = model.estimate_from(0, x_upper, x_lower)
    expected = expected_loss(model, images)
    assert estimate.loss.sum().item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(flat_grad(estimate.surrogate.sum(), model), flat_grad(expected, model),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [Reinforce, lambda: RLOO(n_samples=3)], ids=["reinforce", "rloo"])
def test_unbiased_estimators_chained_through_two_layers_are_unbiased(images, make):
    """Gradients of all parameters (both layers and the output) against the enumerated gradient, per coordinate
    in standard errors. Each of the 60 draws averages 100 independent copies of the batch (one call on the
    batch repeated 100 times), so the test sees 6,000 single-sample gradients at the cost of 60 calls."""
    model, copies = make_sbn(make()), 100
    x_upper, x_lower = model.halves(images.repeat(copies, 1, 1, 1))
    torch.manual_seed(0)
    draws = torch.stack([flat_grad(model.estimate_from(0, x_upper, x_lower).surrogate.sum() / copies, model)
                         for _ in range(60)])
    exact = flat_grad(expected_loss(model, images), model)
    standard_error = draws.std(0) / math.sqrt(len(draws))
    z = (draws.mean(0) - exact) / standard_error.clamp_min(1e-6)
    assert z.abs().max() < 4.5 and (z.abs() > 3).float().mean() < 0.02
    # and the test has power: a gradient off by 10% of its size is detected
    assert ((draws.mean(0) - 1.1 * exact) / standard_error.clamp_min(1e-6)).abs().max() > 4.5


@pytest.mark.parametrize("make", [lambda: GumbelSoftmax(tau=0.5), lambda: StraightThrough()], ids=["gs", "st"])
def test_pathwise_estimators_reach_every_layer(images, make):
    model = make_sbn(make())
    x_upper, x_lower = model.halves(images)
    model.estimate_from(0, x_upper, x_lower).surrogate.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_each_layer_holds_its_own_estimator_state():
    model = make_sbn(Reinforce(), n_layers=3)
    assert len(model.layer_estimators) == 3 and model.estimator is model.layer_estimators[0]
    buffers = [dict(e.named_buffers()) for e in model.layer_estimators]
    assert all(b.keys() == buffers[0].keys() for b in buffers)
    assert len({id(t) for b in buffers for t in b.values()}) == 3 * len(buffers[0])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_prediction_nll_is_the_bound_of_its_exact_distribution(images, n_classes):
    """-log (1/m) sum p(x_lower | h_i) against moments by enumeration of h = (h1, h2), with w = p(x_lower | h2):
    at m = 20,000 within 4.5 standard errors sd(w) / (E[w] sqrt(m)) of -log p(x_lower | x_upper) = -log E[w];
    at m = 2, 400 repeats within 4.5 standard errors of E[-log (w_a + w_b) / 2] over all pairs (a, b), which
    is looser than -log E[w]. K = 2 runs the indicator path, K = 3 the one-hot path."""
    model = make_sbn(Exact(), n_classes=n_classes)
    joint, nll = enumerated_terms(model, images)
    with torch.no_grad():
        p = joint.flatten(1)  # (B, C * C) over (h1, h2)
        w = (-nll)[:, None, :].expand_as(joint).flatten(1).exp()  # (B, C * C)
        mean_w = (p * w).sum(1)
        exact = -mean_w.log()  # (B,)
        sd_ratio = ((p * w ** 2).sum(1) - mean_w ** 2).clamp_min(0).sqrt() / mean_w
        pair_p, pair_bound = p[:, :, None] * p[:, None, :], -((w[:, :, None] + w[:, None, :]) / 2).log()
        two_sample = (pair_p * pair_bound).sum((1, 2))
        two_sample_sd = ((pair_p * pair_bound ** 2).sum((1, 2)) - two_sample ** 2).sqrt()
    assert (two_sample > exact + 1e-3).all()  # Jensen: the 2-sample bound is looser
    torch.manual_seed(0)
    estimate = model.prediction_nll(images, n_samples=20_000)
    assert ((estimate - exact).abs() < 4.5 * sd_ratio / math.sqrt(20_000)).all()
    few = torch.stack([model.prediction_nll(images, n_samples=2) for _ in range(400)]).mean(0)
    assert ((few - two_sample).abs() < 4.5 * two_sample_sd / math.sqrt(400)).all()


@pytest.mark.parametrize("n_layers, hidden_sizes", [(1, ()), (2, ()), (3, ()), (2, (5,))])
def test_two_class_evaluation_makes_the_one_hot_paths_draws(n_layers, hidden_sizes):
    """The indicator path (folded nets) against the one-hot path from the same seed: the same log weights,
    draw by draw, up to float rounding, so the same bound."""
    model = make_sbn(Exact(), n_classes=2, n_vars=7, n_layers=n_layers, hidden_sizes=hidden_sizes, chunk_size=500)
    for parameter in model.parameters():  # logits of several units, so that both classes are drawn often
        torch.nn.init.normal_(parameter, std=1.0)
    images = torch.bernoulli(torch.full((6, *IMAGE), 0.5), generator=torch.Generator().manual_seed(1))
    x_upper, x_lower = model.halves(images)
    with torch.no_grad():
        weights = {}
        for path in (model.one_hot_log_weights, model.two_class_log_weights):
            torch.manual_seed(3)
            weights[path.__name__] = path(x_upper, x_lower)(500)  # (500, B)
    one_hot, indicators = weights["one_hot_log_weights"], weights["two_class_log_weights"]
    assert one_hot.shape == (500, 6) and one_hot.std() > 1  # the draws differ from each other
    torch.testing.assert_close(indicators, one_hot, rtol=1e-5, atol=1e-4)
    torch.manual_seed(3)
    expected = -torch.logsumexp(one_hot, 0) + math.log(500)
    torch.testing.assert_close(model.prediction_nll(images, 500), expected, rtol=1e-5, atol=1e-4)


def test_halves_split_rows():
    model = make_sbn(Exact())
    images = torch.arange(12.0).view(1, *IMAGE)
    upper, lower = model.halves(images)
    assert upper.tolist() == [[0.0, 1, 2, 3, 4, 5]] and lower.tolist() == [[6.0, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("overrides", [["model.n_layers=0"], ["model.hidden_sizes=[0]"], ["model.n_classes=1"]])
def test_bad_sizes_are_refused_by_name(overrides, tmp_path):
    cfg = compose_config(["experiment=jang2017_sbn_base", *SYNTHETIC, *overrides], tmp_path)
    with pytest.raises(Exception, match=overrides[0].split("=")[0]):
        run(cfg)


SYNTHETIC = ["data=synthetic", "data.batch_size=32", "model.n_vars=4", "model.n_classes=3", "model.val_samples=5",
             "model.test_samples=20", "trainer=cpu", "trainer.max_epochs=2", "trainer.enable_model_summary=false",
             "logger=csv"]


@pytest.mark.parametrize("column", ["annealed_st", "muprop", "vimco"])
def test_table1_sbn_row_trains_every_kind_of_column(column, tmp_path):
    cfg = compose_config(["experiment=jang2017_table1_sbn_cat", f"table1_column={column}", *SYNTHETIC], tmp_path)
    results = run(cfg)
    assert json.loads((Path(tmp_path) / "results.json").read_text()) == results
    assert math.isfinite(results["metrics"]["test/nll"]) and results["global_step"] == 2 * (512 // 32)
    if column == "annealed_st":  # the column's slope schedule replaces the row's constant temperature
        assert cfg.schedule._target_.endswith("LinearSlopeSchedule")


def test_layer_gradient_script_splits_the_gradient_by_group_and_scores_directions(images):
    """scripts/sbn_layer_gradients.py: with Exact every draw is the enumerated gradient of the batch mean, cut into
    the groups layer0, layer1, output (in parameter order); cos_mean and cos_draw are 1 on it, -1 on its negative, and
    its identical draws agree in both halves."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import sbn_layer_gradients

    model = make_sbn(Exact())
    draws = sbn_layer_gradients.draws(model, images, 2)
    assert list(draws) == ["layer0", "layer1", "output"]
    exact = flat_grad(expected_loss(model, images) / len(images), model).double()  # the batch mean
    torch.testing.assert_close(torch.cat([d[0] for d in draws.values()]), exact, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(draws["layer1"][0], draws["layer1"][1])
    scores = sbn_layer_gradients.cosines(draws["layer0"], draws["layer0"][0])
    assert scores == pytest.approx({"cos_mean": 1.0, "cos_draw": 1.0, "cos_halves": 1.0})
    assert sbn_layer_gradients.cosines(-draws["output"], draws["output"][0]) == pytest.approx(
        {"cos_mean": -1.0, "cos_draw": -1.0, "cos_halves": 1.0})
