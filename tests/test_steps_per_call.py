"""steps_per_call=k: the same run as k = 1, bit for bit, for every k (catvae.step_calls, catvae.models.stepped).

Each case trains once at k = 1 and again at k > 1 and compares every checkpoint the runs wrote (weights, estimator
buffers and parameters, optimiser state, global step), every metrics row (the same keys at the same steps, including
the temperature and the gradient diagnostics) and the test metrics. The epochs have 8 steps, checkpoints come every 4
and the loggers write every 4, so k = 3 cuts an epoch into calls of 3, 1, 3, 1 steps; max_steps = 20 ends the third
epoch in its middle.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from catvae.run import run
from catvae.step_calls import GroupedLoader, StepGrouping, check_trainer
from conftest import FAST, compose_config
from test_kill_resume import assert_continues, assert_same, checkpoint_state, logged, run_until_killed
from test_m2 import RUN as M2_RUN
from test_sbn import SYNTHETIC as SBN_SYNTHETIC

GROUPED = ["callbacks.step_checkpoint.every_n_train_steps=4", "trainer.max_epochs=3", "+trainer.max_steps=20",
           "trainer.log_every_n_steps=4"]
VAE = FAST + GROUPED

CASES = {
    "gumbel_softmax": ["estimator=gumbel_softmax"],
    "gumbel_softmax, jang_exp every 2 steps": ["estimator=gumbel_softmax", "schedule=jang_exp", "schedule.every=2",
                                               "schedule.rate=0.05"],
    "reinforce": ["estimator=reinforce"],
    "rloo": ["estimator=rloo"],
    "nvil (own parameters, second parameter group)": ["estimator=nvil"],
    "rebar (double backward)": ["estimator=rebar"],
    "slope_annealed_st": ["estimator=slope_annealed_st", "schedule=slope_linear", "schedule.every=8",
                          "schedule.rate=0.05"],
    "gradient diagnostics every 8 steps": ["estimator=reinforce", "callbacks=grad_diagnostics",
                                           "callbacks.grad_diagnostics.every_n_steps=8",
                                           "callbacks.grad_diagnostics.n_draws=4",
                                           "callbacks.grad_diagnostics.batch_size=16"],
    "bf16-mixed": ["estimator=gumbel_softmax", "trainer.precision=bf16-mixed"],
    "deferred guard": ["estimator=gumbel_softmax", "callbacks.nonfinite_guard.check_every_n_steps=4"],
}


def assert_same_run(reference: Path, grouped: Path) -> None:
    """Both runs wrote the same checkpoints, metrics rows and results."""
    a, b = (json.loads((d / "results.json").read_text()) for d in (reference, grouped))
    assert a["metrics"] == b["metrics"] and a["global_step"] == b["global_step"]
    names = sorted(p.name for p in (reference / "checkpoints").glob("*.ckpt"))
    assert names == sorted(p.name for p in (grouped / "checkpoints").glob("*.ckpt")) and names
    for name in names:
        assert_same(checkpoint_state(reference / "checkpoints" / name), checkpoint_state(grouped / "checkpoints" / name),
                    name)
    assert logged(reference) == logged(grouped)


@pytest.mark.parametrize("case", list(CASES))
def test_k_steps_per_call_is_the_run_of_one_step_per_call(case, tmp_path):
    overrides = VAE + CASES[case]
    run(compose_config(overrides, tmp_path / "k1"))
    ks = (3, 16) if case == "gumbel_softmax" else (3,)  # 16: longer than an epoch, every call cut by the periods
    for k in ks:
        run(compose_config(overrides + [f"steps_per_call={k}"], tmp_path / f"k{k}"))
        assert_same_run(tmp_path / "k1", tmp_path / f"k{k}")
    rows = logged(tmp_path / "k1")
    assert [row["step"] for row in rows if "train/loss" in row] == ["3", "7", "11", "15", "19"]
    if "diagnostics" in case:
        assert [row["step"] for row in rows if "grad/reinforce/var" in row] == ["0", "8", "16"]


def test_a_metric_logged_each_step_is_logged_at_every_step(tmp_path):
    """With the loggers writing every step, every call is one step long, and the rows are those of k = 1."""
    overrides = FAST + ["trainer.max_epochs=1", "callbacks.step_checkpoint.every_n_train_steps=4", "estimator=rloo"]
    run(compose_config(overrides, tmp_path / "k1"))
    run(compose_config(overrides + ["steps_per_call=5"], tmp_path / "k5"))
    assert_same_run(tmp_path / "k1", tmp_path / "k5")
    assert len([row for row in logged(tmp_path / "k5") if "train/loss" in row]) == 8


@pytest.mark.parametrize("model", ["sbn", "m2"])
def test_the_other_models_are_the_same_run_for_every_k(model, tmp_path):
    overrides = {"sbn": ["experiment=jang2017_sbn_base", *SBN_SYNTHETIC, "estimator=reinforce",
                         "trainer.log_every_n_steps=4"],
                 "m2": [*M2_RUN, "estimator=gumbel_softmax", "trainer.enable_model_summary=false"]}[model]
    overrides.append("callbacks.step_checkpoint.every_n_train_steps=4")
    run(compose_config(overrides, tmp_path / "k1"))
    run(compose_config(overrides + ["steps_per_call=3"], tmp_path / "k3"))
    assert_same_run(tmp_path / "k1", tmp_path / "k3")


def test_a_skipped_non_finite_step_inside_a_call_is_skipped_as_at_k1(tmp_path):
    """The guard acts at every step of a call: a NaN loss at step 5 (inside the call of steps 4-6) is skipped."""
    overrides = VAE + ["estimator=gumbel_softmax", "model._target_=test_reliability.PoisonedVAE", "+model.poison_step=5",
                       "callbacks.nonfinite_guard.policy=skip"]
    run(compose_config(overrides, tmp_path / "k1"))
    run(compose_config(overrides + ["steps_per_call=3"], tmp_path / "k3"))
    assert_same_run(tmp_path / "k1", tmp_path / "k3")
    assert [row["train/skipped_steps"] for row in logged(tmp_path / "k3") if "train/skipped_steps" in row][:2] == [
        "0.0", "1.0"]


def test_a_non_finite_step_inside_a_call_raises_naming_that_step(tmp_path):
    overrides = VAE + ["estimator=gumbel_softmax", "model._target_=test_reliability.PoisonedVAE", "+model.poison_step=5",
                       "steps_per_call=3"]
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 5 with estimator gumbel_softmax"):
        run(compose_config(overrides, tmp_path / "k3"))


# moment -> (hook, global step, the global step of the checkpoint the resume starts from, the step of the resumed run's
# first metrics row: the loggers write at steps 3, 7, 11, ...)
KILLS = {
    "inside_a_call": ("on_before_optimizer_step", 13, 12, 15),  # the call of steps 12-14, at its second step
    "at_the_end_of_an_epoch_before_validation": ("on_validation_start", 16, 12, 15),
    "after_the_epoch_end_checkpoints_before_the_next_epoch": ("on_train_epoch_start", 16, 16, 19),
    "during_the_test": ("on_test_batch_start", 20, 20, 20),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run at k = 1 (reinforce)."""
    path = tmp_path_factory.mktemp("reference")
    run(compose_config(VAE + ["estimator=reinforce"], path))
    return path


@pytest.mark.parametrize("moment", list(KILLS))
def test_a_run_killed_anywhere_resumes_to_the_run_of_k1(moment, reference, tmp_path):
    hook, step, resumed_at, first_row = KILLS[moment]
    overrides = VAE + ["estimator=reinforce", "steps_per_call=3"]
    killed = tmp_path / "killed"
    run_until_killed(compose_config(overrides + ["+callbacks.kill._target_=test_kill_resume.KillAt",
                                                 f"+callbacks.kill.hook={hook}", f"+callbacks.kill.step={step}"], killed))
    resumed = run(compose_config(overrides + [f"resume={killed}"], tmp_path / "resumed"))
    assert torch.load(resumed["resumed_from"], weights_only=True)["global_step"] == resumed_at
    assert_continues(reference, tmp_path / "resumed", first_row)


def test_a_resume_may_not_change_steps_per_call(reference, tmp_path):
    with pytest.raises(ValueError, match="steps_per_call: 1 in the checkpoint, 2 now"):
        run(compose_config(VAE + ["estimator=reinforce", "steps_per_call=2", f"resume={reference}"], tmp_path / "r"))


def test_calls_end_at_epoch_ends_max_steps_and_every_period():
    grouping = StepGrouping(5, {"logging": 4, "checkpoints": 6}, max_steps=30)
    assert grouping.calls(0, 12) == [4, 2, 2, 4]  # ends at 4, 6, 8, 12
    assert grouping.calls(12, 12) == [4, 2, 2, 4]  # the same cut in every epoch
    assert grouping.length(24, 12) == 4 and grouping.length(28, 8) == 2  # 28 -> 30: max_steps
    assert StepGrouping(16, {"logging": 50}).calls(0, 100) == [16, 16, 16, 2] * 2


def test_the_grouped_loader_yields_consecutive_batches_and_resumes_at_a_call_end():
    from catvae.data import SyntheticDataModule

    dm = SyntheticDataModule(batch_size=16, train_size=192)  # 12 batches an epoch
    dm.setup("fit")
    grouping = StepGrouping(5, {"logging": 4, "checkpoints": 6})
    batches = [x for x, _ in dm.train_batches()]
    loader = GroupedLoader(dm.train_batches(), grouping)
    assert len(loader) == 4
    groups = list(loader)
    assert [len(g) for g in groups] == [4, 2, 2, 4]
    assert all(torch.equal(a, b) for a, b in zip([x for g in groups for x, _ in g], batches))
    partial = GroupedLoader(dm.train_batches(), grouping)
    iterator = iter(partial)
    next(iterator), next(iterator)
    state = partial.state_dict()
    assert state["position"] == 6 and state["batches"]["consumed"] == 6
    resumed = GroupedLoader(dm.train_batches(), grouping)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [len(g) for g in rest] == [2, 4]
    assert all(torch.equal(a, b) for a, b in zip([x for g in rest for x, _ in g], batches[6:]))


@pytest.mark.parametrize("overrides, message", [
    (["steps_per_call=0"], "steps_per_call must be an integer >= 1, got 0"),
    (["steps_per_call=two"], "steps_per_call must be an integer >= 1, got 'two'"),
    (["steps_per_call=3", "trainer.log_every_n_steps=3"],
     "trainer.log_every_n_steps=3 is neither .*choose e.g. 2 or 8"),
    (["steps_per_call=3", "trainer.log_every_n_steps=8", "callbacks.step_checkpoint.every_n_train_steps=8",
      "trainer.max_steps=23"],
     r"trainer.max_steps=23 falls inside the last call of its epoch \(steps 22..24\)"),
    (["steps_per_call=3", "+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0"),
    (["steps_per_call=3", "+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2"),
])
def test_what_grouping_cannot_keep_exact_is_refused_before_training(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run(compose_config(VAE + ["estimator=reinforce", *overrides], tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_refused_run_starts_no_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ValueError, match="trainer.log_every_n_steps=3 is neither"):
        run(compose_config(VAE + ["steps_per_call=3", "trainer.log_every_n_steps=3", "logger=wandb"], tmp_path / "run"))
    assert not (tmp_path / "run" / "wandb").exists()


def test_a_grad_scaler_is_refused():
    trainer = SimpleNamespace(precision="16-mixed", precision_plugin=SimpleNamespace(scaler=object()),
                              gradient_clip_val=None, accumulate_grad_batches=1, val_check_interval=1.0,
                              limit_train_batches=1.0)
    with pytest.raises(ValueError, match="steps_per_call=4 cannot be combined with trainer.precision='16-mixed'"):
        check_trainer(trainer, 4)
