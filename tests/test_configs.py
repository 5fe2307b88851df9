"""Every YAML in conf/ composes and instantiates; bad values are rejected before training."""

import math
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from catvae.run import run, set_flush_denormal
from conftest import CONF_DIR, FAST, compose_config

GROUPS = ["data", "model", "estimator", "schedule", "callbacks", "logger", "trainer"]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]
# Estimators with latent-size constraints get a latent space they accept.
LATENTS_FOR = {"arm": ["model.n_classes=2"], "double_cv": ["model.n_classes=2"], "exact": ["model.n_vars=3"]}
EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


def build_all(cfg, with_trainer: bool = True):
    """Instantiate every group as run() does, without fitting."""
    datamodule = instantiate(cfg.data)
    estimator = instantiate(cfg.estimator)
    model = instantiate(cfg.model, estimator=estimator, image_shape=list(datamodule.image_shape))
    schedule = instantiate(cfg.schedule)
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values()]
    loggers = [instantiate(node) for node in (cfg.logger or {}).values()]
    if with_trainer:
        instantiate(cfg.trainer, callbacks=callbacks + [schedule], logger=loggers or False)
    return datamodule, estimator, model


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_instantiates(group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_config([f"{group}={option}", *LATENTS_FOR.get(option, [])], tmp_path)
    needs_gpu = cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available()  # CI has no GPU
    _, estimator, _ = build_all(cfg, with_trainer=not needs_gpu)
    if group == "estimator":
        assert estimator.name == option == cfg.estimator.name


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_instantiates(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.experiment_name == experiment
    build_all(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiments_optimiser_is_fused(experiment, tmp_path):
    """Adam (model defaults) and SGD (Jang et al.'s protocols) both get the fused update."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    optimiser = instantiate(cfg.model.optimizer)([torch.nn.Parameter(torch.zeros(3))])
    assert optimiser.defaults["fused"] is True, type(optimiser).__name__


def test_jang2017_vae_cat_is_the_full_protocol(tmp_path):
    cfg = compose_config(["experiment=jang2017_vae_cat", "estimator=gumbel_softmax"], tmp_path)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.data.binarization) == (100, 100, "fixed")
    assert (cfg.model.n_vars, cfg.model.n_classes, cfg.model.iw_samples) == (20, 10, 1000)
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.model.optimizer.lr == 1e-3
    schedule = instantiate(cfg.schedule)
    assert schedule.value(0) == 1.0 and schedule.value(999) == 1.0
    assert schedule.value(1000) == pytest.approx(math.exp(-0.1))
    assert schedule.value(50_000) == 0.5


def test_unknown_group_option_keeps_hydras_message_listing_the_options():
    with pytest.raises(ConfigCompositionException, match="Could not find 'estimator/gumbel'") as info:
        compose_config(["estimator=gumbel"])
    assert "gumbel_softmax" in str(info.value) and "reinforce" in str(info.value)


BAD_INPUTS = [
    (["estimator=gumbel_softmax", "estimator.tau=0"], r"estimator.tau must be a positive finite number .* got 0"),
    (["estimator=st_gumbel_softmax", "estimator.tau=-1.5"], r"estimator.tau must be a positive finite number .* got -1.5"),
    (["estimator=gumbel_softmax", "estimator.tau=inf"], r"estimator.tau must be a positive finite number .* got inf"),
    (["estimator=gumbel_softmax", "estimator.tau=nan"], r"estimator.tau must be a positive finite number .* got nan"),
    (["schedule=jang_exp", "schedule.tau_min=0"], r"schedule.tau_min must be a positive finite number .* got 0"),
    (["schedule=jang_exp", "schedule.rate=-1e-4"], r"schedule.rate must be a finite number >= 0, got -0.0001"),
    (["schedule=jang_exp", "schedule.every=0"], r"schedule.every must be an integer >= 1, got 0"),
    (["model.n_vars=0"], r"model.n_vars must be an integer >= 1, got 0"),
    (["model.n_classes=1"], r"model.n_classes must be an integer >= 2, got 1"),
    (["model.hidden_sizes=[32,0]"], r"model.hidden_sizes must be positive integers, got \[32, 0\]"),
    (["model.iw_samples=0"], r"model.iw_samples must be an integer >= 1, got 0"),
    (["data.binarization=otsu"], r"data.binarization='otsu' is not allowed; choose one of"),
    (["data.batch_size=0"], r"data.batch_size must be an integer >= 1, got 0"),
    (["estimator=reinforce", "estimator.baseline.decay=1.0"], r"decay must be in \[0, 1\), got 1.0"),
    (["estimator=gst", "estimator.gap=0"], r"estimator.gap must be a positive finite number or 'adaptive', got 0"),
    (["estimator=gst", "estimator.gap=wide"], r"estimator.gap must be a positive finite number or 'adaptive', got 'wide'"),
    (["estimator=rloo", "estimator.n_samples=1"], r"estimator.n_samples must be an integer >= 2, got 1"),
    (["estimator=gumbel_rao", "estimator.n_samples=0"], r"estimator.n_samples must be an integer >= 1, got 0"),
    (["estimator=exact", "model.n_vars=7"], r"enumerates K\^N = 4\^7 = 16384 configurations, more than "
                                            r"estimator.max_configurations=4096"),
    (["estimator=arm"], r"estimator arm supports Bernoulli latents only \(model.n_classes=2\), got model.n_classes=4"),
    (["schedule=jang_exp", "schedule.tau0=0"], r"schedule.tau0 must be a positive finite number .* got 0"),
    (["schedule=slope_linear", "schedule.slope_max=-1"], r"schedule.slope_max must be a positive finite number .* got -1"),
    (["model.iw_chunk_size=0"], r"model.iw_chunk_size must be an integer >= 1, got 0"),
    (["data.eval_batch_size=0"], r"data.eval_batch_size must be an integer >= 1, got 0"),
    (["+data.train_size=100000"], r"data.train_size=100000 exceeds the \d+ train images available"),
    (["data.batch_size=100000"], r"data.batch_size=100000 exceeds the \d+ training images"),
    (["callbacks.nonfinite_guard.policy=ignore"],
     r"callbacks.nonfinite_guard.policy='ignore' is not allowed; choose one of \['raise', 'skip'\]"),
    (["callbacks.nonfinite_guard.check_every_n_steps=0"],
     r"callbacks.nonfinite_guard.check_every_n_steps must be an integer >= 1, got 0"),
    (["callbacks.nonfinite_guard.check_every_n_steps=10", "model.optimizer.fused=false"],
     r"check_every_n_steps=10 needs an optimiser that skips a step on the device .* got Adam with fused=False"),
    (["callbacks.code_usage.min_frequency=0"], r"callbacks.code_usage.min_frequency must be in \(0, 1\), got 0"),
    (["callbacks=grad_diagnostics", "callbacks.grad_diagnostics.n_draws=1"],
     r"callbacks.grad_diagnostics.n_draws must be an integer >= 2, got 1"),
    (["resume=/nonexistent/run"], r"resume='/nonexistent/run' is neither a checkpoint file nor a run directory"),
    (["seed=-1"], r"seed must be an integer >= 0, got -1"),
    (["test_ckpt=first"], r"test_ckpt='first' is not allowed; choose one of \['best', 'last', None\]"),
    (["flush_denormal=sometimes"], r"flush_denormal='sometimes' is not allowed; choose one of \[False, True\]"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_inputs_are_rejected_before_training(overrides, message, tmp_path):
    cfg = compose_config(FAST + overrides, tmp_path / "run")
    with pytest.raises(Exception, match=message):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "csv").exists()


def test_unreadable_data_dir_is_rejected_before_training(tmp_path):
    not_a_dir = tmp_path / "data_file"
    not_a_dir.write_text("")
    cfg = compose_config(["data=mnist", f"data.data_dir={not_a_dir}", "logger=csv", "trainer=cpu"], tmp_path / "run")
    with pytest.raises(Exception, match=f"data.data_dir='{not_a_dir}' is not a readable directory"):
        run(cfg)
    assert not Path(tmp_path / "run" / "csv").exists()


def test_flush_denormal_reads_denormals_as_zero_and_the_sbn_experiments_turn_it_on(tmp_path):
    denormal = torch.tensor([1e-39])
    assert denormal.item() > 0
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    try:
        set_flush_denormal(True)
        assert (denormal * 1.0).item() == 0.0
        set_flush_denormal(False)
        assert (denormal * 1.0).item() > 0
        run(compose_config(FAST + ["flush_denormal=true"], tmp_path / "run"))  # run() sets it from the config
        assert (denormal * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
    for experiment in ("jang2017_table1_sbn_bern", "jang2017_table1_sbn_cat", "jang2017_sbn_base"):
        assert compose_config([f"experiment={experiment}"], tmp_path / experiment).flush_denormal is True
    assert compose_config([], tmp_path / "default").flush_denormal is False
