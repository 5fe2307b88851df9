"""The semi-supervised M2 model, its data module and the speed-vs-classes script (synthetic data, CPU)."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from catvae.data_semisupervised import SemiSupervisedSynthetic
from catvae.estimators import Exact
from catvae.models.m2 import ConvDecoder, SemiSupervisedM2
from catvae.models.vae import CategoricalVAE
from catvae.run import run
from conftest import CONF_DIR, ESTIMATORS, ROOT, compose_config

K = 4  # the synthetic data's classes (n_levels)
SMALL = ["model.channels=[4,8,8]", "model.z_dim=3"]
# experiment=jang2017_m2_cpu on the synthetic images: 2 epochs of 4 steps (batches of 64 + 16), csv logger.
RUN = ["experiment=jang2017_m2_cpu", "data=synthetic_semisupervised", f"model.n_classes={K}", *SMALL,
       "data.n_train=256", "data.batch_size=64", "data.labelled_batch_size=16", "data.n_labelled=16",
       "model.alpha_scale=16", "data.eval_batch_size=128", "data.val_size=null", "+trainer.max_steps=8",
       "trainer.max_epochs=2", "trainer.val_check_interval=null", "trainer.log_every_n_steps=2", "logger=csv"]


def synthetic(**kwargs) -> SemiSupervisedSynthetic:
    dm = SemiSupervisedSynthetic(**{"n_labelled": 16, "labelled_batch_size": 8, "batch_size": 32,
                                    "binarization": "dynamic", **kwargs})
    dm.setup()
    return dm


def model(estimator=None, n_classes: int = K, **kwargs) -> SemiSupervisedM2:
    torch.manual_seed(0)
    return SemiSupervisedM2(estimator or Exact(), torch.optim.Adam, [1, 8, 8], n_classes=n_classes, z_dim=3,
                            channels=[4, 8, 8], **kwargs)


@pytest.fixture
def deterministic_z(monkeypatch):
    """z = the mean of q(z|x,y): the objective becomes a deterministic function of y."""
    monkeypatch.setattr(SemiSupervisedM2, "reparameterize", lambda self, mean, log_var: mean)


def test_shapes():
    dm = synthetic()
    x, x_labelled, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x_labelled.shape == (8, 1, 8, 8) and labels.shape == (8,)
    m = model()
    logits, features = m.classify(x)
    assert logits.shape == (32, K) and features.shape == (32, m.estimator_context_dim)
    y = F.one_hot(torch.randint(K, (5, 32)), K).float()  # (S, B, K)
    assert m.nelbo_given_y(x.flatten(1), m.z_body(x), y).shape == (5, 32)
    estimate, kl, logits = m.unlabelled_estimate(x)
    assert logits.shape == (32, 1, K) and estimate.loss.shape == kl.shape == (32,) and estimate.z.shape == (K, 32, 1, K)
    nelbo, cross_entropy = m.labelled_loss(x_labelled, labels)
    assert nelbo.shape == cross_entropy.shape == (8,)
    # The decoder retraces the encoder's sizes for any image size, MNIST's included.
    for shape in ([1, 28, 28], [3, 9, 6]):
        decoder = ConvDecoder(K + 3, shape, [16, 32, 64])
        assert decoder(torch.randn(2, 5, K + 3)).shape == (2, 5, math.prod(shape))


def test_labelled_set_is_a_balanced_seeded_draw_from_the_training_split():
    dm = synthetic(n_labelled=20)
    images, labels = dm.splits["train"]
    assert dm.n_classes == K and len(dm.labelled_index) == 20 and len(set(dm.labelled_index.tolist())) == 20
    assert torch.bincount(labels[dm.labelled_index], minlength=K).tolist() == [5] * K
    assert torch.equal(dm.labelled_index, synthetic(n_labelled=20).labelled_index)
    assert not torch.equal(dm.labelled_index, synthetic(n_labelled=20, labelled_seed=1).labelled_index)
    # The labelled loader serves those images (binarized per batch) with their true labels.
    labelled = dm.train_dataloader().labelled
    assert torch.equal(labelled.images, images[dm.labelled_index])
    assert torch.equal(labelled.labels, labels[dm.labelled_index])
    _, x_labelled, y = next(iter(dm.train_dataloader()))
    assert set(x_labelled.unique().tolist()) == {0.0, 1.0} and set(y.tolist()) <= set(range(K))


def test_training_batches_are_resumable_and_follow_the_epoch():
    dm = synthetic()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 512 // 32
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 0, "consumed": 5})
    for expected, got in zip(batches[5:], resumed):
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert resumed.state_dict() == {"epoch": 0, "consumed": len(batches)}
    loader.sampler.set_epoch(1)  # what Lightning calls: both streams move on
    first = next(iter(loader))
    assert not torch.equal(first[0], batches[0][0]) and not torch.equal(first[1], batches[0][1])


def test_random_labels_give_k_classes():
    dm = synthetic(label_classes=7, n_labelled=14)
    assert dm.n_classes == 7
    for split in ("train", "val", "test"):
        assert set(dm.splits[split][1].tolist()) == set(range(7))
    assert torch.bincount(dm.splits["train"][1][dm.labelled_index], minlength=7).tolist() == [2] * 7
    assert torch.equal(dm.splits["train"][1], synthetic(label_classes=7, n_labelled=14).splits["train"][1])


def test_exact_unlabelled_loss_is_the_marginal_negative_elbo(deterministic_z):
    m = model(Exact())
    x = synthetic().splits["val"][0][:16]  # (16, 1, 8, 8)
    estimate, kl, logits = m.unlabelled_estimate(x)
    loss = estimate.loss + kl

    q = logits[:, 0].softmax(-1)  # (B, K)
    h = m.z_body(x)
    by_hand = sum(q[:, k] * m.nelbo_given_y(x.flatten(1), h, F.one_hot(torch.full((16,), k), K).float())
                  for k in range(K))
    by_hand = by_hand + (q * q.log()).sum(-1) + math.log(K)  # + KL(q(y|x) || Uniform(K))
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(m.marginal_nelbo(x)[0], by_hand)
    # The exact estimator's gradient is the gradient of the marginal bound.
    params = list(m.parameters())
    grads = torch.autograd.grad(CategoricalVAE.surrogate_loss(estimate, kl), params, retain_graph=True)
    expected = torch.autograd.grad(by_hand.mean(), params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_labelled_loss_and_the_training_objective(deterministic_z):
    m = model(Exact(), alpha=0.3, alpha_scale=20)
    dm = synthetic()
    unlabelled, x_labelled, labels = next(iter(dm.train_dataloader()))
    nelbo, cross_entropy = m.labelled_loss(x_labelled, labels)

    x, y = x_labelled.flatten(1), F.one_hot(labels, K).float()
    mean, log_var = (m.z_from_x(m.z_body(x_labelled)) + m.z_from_y(y)).chunk(2, -1)  # q(z|x,y), z = its mean
    x_logits = m.decoder(torch.cat([y, mean], -1))
    recon = -(x * F.logsigmoid(x_logits) + (1 - x) * F.logsigmoid(-x_logits)).sum(-1)
    kl_z = 0.5 * (mean ** 2 + log_var.exp() - 1 - log_var).sum(-1)
    torch.testing.assert_close(nelbo, recon + kl_z + math.log(K))  # -log p(y) = log K
    log_q = m.classify(x_labelled)[0].log_softmax(-1)
    torch.testing.assert_close(cross_entropy, -log_q.gather(1, labels[:, None])[:, 0])

    loss, metrics = m.loss_and_metrics((unlabelled, x_labelled, labels))
    expected = m.marginal_nelbo(unlabelled)[0].mean() + (nelbo + 0.3 * 20 * cross_entropy).mean()
    torch.testing.assert_close(loss, expected)  # exact: the surrogate is the objective's value
    torch.testing.assert_close(metrics["train/loss"], expected)
    assert not metrics["train/loss"].requires_grad


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_gives_a_finite_training_gradient(estimator):
    est = instantiate(compose_config([f"estimator={estimator}"]).estimator)
    n_classes = 2 if est.binary_only else K
    m = model(est, n_classes=n_classes)
    dm = synthetic(label_classes=n_classes, n_labelled=8)
    loss, metrics = m.loss_and_metrics(next(iter(dm.train_dataloader())))
    loss.backward()
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert m.to_logits.weight.grad.abs().sum() > 0 and m.decoder.to_map[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("estimator", ["exact", "gumbel_softmax", "st_gumbel_softmax"])
def test_a_short_cpu_protocol_run(estimator, tmp_path):
    cfg = compose_config(RUN + [f"estimator={estimator}"], tmp_path / "run")
    results = run(cfg)
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "results.json").read_text())
    assert saved == results and saved["estimator"] == estimator and saved["global_step"] == 8
    metrics = saved["metrics"]
    assert set(metrics) == {"test/nelbo", "test/accuracy"} and math.isfinite(metrics["test/nelbo"])
    assert 0 <= metrics["test/accuracy"] <= 1
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    assert len([r for r in rows if r.get("train/loss")]) == 4  # every second step
    assert Path(saved["tested_checkpoint"]).name.startswith("best-epoch")


def test_the_experiments_follow_the_paper():
    cfg = compose_config(["experiment=jang2017_m2", "seed=2"])
    assert (cfg.data.n_labelled, cfg.data.binarization, cfg.data.labelled_seed, cfg.model.n_classes) == \
        (100, "dynamic", 2, 10)
    schedule = instantiate(cfg.schedule)
    assert schedule.value(1999) == 1.0 and schedule.value(2000) == pytest.approx(math.exp(-0.06))
    assert schedule.value(40_000) == 0.5
    sweep = OmegaConf.load(CONF_DIR / "experiment" / "jang2017_m2.yaml").hydra.sweeper.params
    assert sweep.estimator == "exact,gumbel_softmax,st_gumbel_softmax"
    speed = compose_config(["experiment=jang2017_m2_speed", "model.n_classes=30"])
    assert speed.data.label_classes == speed.data.n_labelled == 30


BAD_INPUTS = [
    (["data.n_labelled=10"], r"data.n_labelled=10 must be a multiple of the number of classes K=4"),
    (["data.n_labelled=1024"], r"data.n_labelled=1024 exceeds the 256 training images available"),
    (["data.n_labelled=0"], r"data.n_labelled must be an integer >= 1, got 0"),
    (["data.label_classes=1"], r"data.label_classes must be an integer >= 2, got 1"),
    (["model.alpha=-0.1"], r"model.alpha must be a finite number >= 0, got -0.1"),
    (["model.alpha_scale=nan"], r"model.alpha_scale must be a finite number >= 0, got nan"),
    (["model.channels=[]"], r"model.channels must list at least one convolution's channels, got \[\]"),
    (["model.channels=[8,0]"], r"model.channels must be positive integers, got \[8, 0\]"),
    (["model.n_classes=5"], r"model.n_classes=5 differs from the data's 4 classes"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_inputs_are_rejected_before_training(overrides, message, tmp_path):
    cfg = compose_config(RUN + ["estimator=gumbel_softmax", *overrides], tmp_path / "run")
    with pytest.raises((ValueError, InstantiationException), match=message):  # Hydra wraps constructors' errors
        run(cfg)
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


def test_speed_script_runs_end_to_end(tmp_path):
    out = tmp_path / "speed"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "speed_vs_classes.py"), "--steps", "2",
                           "--warmup", "1", "--classes", "10", "20", "--threads", "1", "--out", str(out),
                           "--overrides", "data=synthetic_semisupervised", *SMALL, "data.batch_size=8",
                           "data.labelled_batch_size=8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "speed_vs_classes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["classes"]) for r in rows] == [10, 20]
    assert all(float(r["exact steps/s"]) > 0 and float(r["speed-up"]) > 0 for r in rows)
    assert (out / "speed_vs_classes.png").is_file() and "| 10 |" in (out / "speed_vs_classes.md").read_text()
