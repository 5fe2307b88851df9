"""Exact resume wherever a run is killed: a real training process is killed with SIGKILL at a chosen moment (inside an
epoch, right after a step checkpoint that ends an epoch, during validation, between validation and the next epoch,
during the test, in the middle of a checkpoint write), resumed from its run directory, and compared with an
uninterrupted run: the same metrics rows, test metrics, global step, final weights and optimiser and estimator state.

The killed process is forked from the test process (so it starts in milliseconds) and kills itself with SIGKILL from a
callback at the moment chosen: nothing after that moment runs, no handler, no flush. The command-line and multirun
cases run train.py in a fresh interpreter.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from catvae.run import run
from conftest import FAST, compose_config
from test_compare import script
from test_training import read_metrics, train_cli

# Epochs of 8 steps (512 images, batch 64), a step checkpoint every 4 steps, 20 steps: epochs 0 and 1 end on a step
# checkpoint (steps 8 and 16), epoch 2 is cut short by max_steps, as in a run whose max_steps is not a whole number of
# epochs.
KILLABLE = ["callbacks.step_checkpoint.every_n_train_steps=4", "trainer.max_epochs=3", "+trainer.max_steps=20"]
STEPS = 20


class KillAt(pl.Callback):
    """SIGKILLs this process at ``hook`` when the global step is ``step`` (in runs of ``estimator`` only, if given);
    ``hook="checkpoint_write"`` kills it half-way through writing ``last.ckpt`` at that step."""

    affects_training = False

    def __init__(self, hook: str, step: int, estimator: str | None = None):
        self.hook, self.step, self.estimator = hook, step, estimator

    def kill_if(self, trainer: pl.Trainer, hook: str) -> None:
        if self.estimator not in (None, trainer.lightning_module.estimator.name):
            return
        if hook == self.hook and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage):
        if self.hook != "checkpoint_write":
            return
        from fsspec.implementations.local import LocalFileOpener

        write, callback = LocalFileOpener.write, self

        def write_half_then_die(opener, data):
            if str(opener.path).endswith("last.ckpt") and trainer.global_step == callback.step:
                opener.f.write(data[: len(data) // 2])
                opener.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return write(opener, data)

        LocalFileOpener.write = write_half_then_die

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.kill_if(trainer, "on_train_batch_start")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.kill_if(trainer, "on_before_optimizer_step")

    def on_validation_start(self, trainer, pl_module):
        self.kill_if(trainer, "on_validation_start")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.kill_if(trainer, "on_validation_batch_end")

    def on_train_epoch_start(self, trainer, pl_module):
        self.kill_if(trainer, "on_train_epoch_start")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.kill_if(trainer, "on_test_batch_start")


# moment -> (hook, global step, the checkpoint the resume picks, the global step it resumes at; None: either of two)
MOMENTS = {
    "inside_an_epoch": ("on_train_batch_start", 14, "step000012.ckpt", 12),
    # the step checkpoint of an epoch's last step waits for the epoch's end: the resume replays steps 13-16
    "at_the_end_of_an_epoch_before_validation": ("on_validation_start", 16, "step000012.ckpt", 12),
    "during_validation": ("on_validation_batch_end", 16, "step000012.ckpt", 12),
    "after_the_epoch_end_checkpoints_before_the_next_epoch": ("on_train_epoch_start", 16, "step000016.ckpt", 16),
    "during_the_test": ("on_test_batch_start", STEPS, f"step{STEPS:06d}.ckpt", STEPS),
    # last.ckpt of step 16 cut short: the newest readable checkpoint is best-epoch001 (16) or step000012 (12)
    "during_a_checkpoint_write": ("checkpoint_write", 16, None, None),
}


def config(path: Path, estimator: str, *overrides: str):
    return compose_config(FAST + KILLABLE + [f"estimator={estimator}", *overrides], path)


def killed_child(cfg) -> None:
    torch.set_num_threads(1)
    run(cfg)


def run_until_killed(cfg) -> None:
    """Runs ``cfg`` in a forked process that must die of SIGKILL."""
    process = multiprocessing.get_context("fork").Process(target=killed_child, args=(cfg,))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == -signal.SIGKILL, f"the run was not killed (exit code {process.exitcode})"


def checkpoint_state(path: Path) -> dict:
    """Weights (estimator buffers and parameters included), optimiser state and global step of a checkpoint."""
    checkpoint = torch.load(path, weights_only=True)
    return {"weights": checkpoint["state_dict"], "optimizer": checkpoint["optimizer_states"],
            "global_step": checkpoint["global_step"]}


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def logged(run_dir: Path) -> list[dict]:
    """The metrics rows of a run, each as its non-empty entries (a run's CSV has a column per key it logged)."""
    return [{key: value for key, value in row.items() if value != ""} for row in read_metrics(run_dir)]


def assert_continues(full_dir: Path, resumed_dir: Path, resumed_at: int) -> None:
    full, resumed = (json.loads((d / "results.json").read_text()) for d in (full_dir, resumed_dir))
    assert resumed["global_step"] == full["global_step"] == STEPS
    assert resumed["metrics"] == full["metrics"]
    final = f"step{STEPS:06d}.ckpt"  # the state after the last step
    assert_same(checkpoint_state(full_dir / "checkpoints" / final), checkpoint_state(resumed_dir / "checkpoints" / final))
    # the resumed run logs the uninterrupted run's rows from its first step (or its test) on, and nothing else
    full_rows, resumed_rows = logged(full_dir), logged(resumed_dir)
    assert resumed_rows == full_rows[len(full_rows) - len(resumed_rows):]
    assert resumed_rows[0]["step"] == str(resumed_at)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """estimator -> the run directory of its uninterrupted run (made once per module)."""
    made = {}

    def get(estimator: str) -> Path:
        if estimator not in made:
            made[estimator] = tmp_path_factory.mktemp(f"full_{estimator}")
            run(config(made[estimator], estimator))
        return made[estimator]
    return get


@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("estimator", ["gumbel_softmax", "reinforce", "rloo"])
def test_a_run_killed_at_any_moment_resumes_exactly(estimator, moment, uninterrupted, tmp_path):
    hook, step, expected_checkpoint, resumed_at = MOMENTS[moment]
    killed = tmp_path / "killed"
    run_until_killed(config(killed, estimator, "+callbacks.kill._target_=test_kill_resume.KillAt",
                            f"+callbacks.kill.hook={hook}", f"+callbacks.kill.step={step}"))
    assert json.loads((killed / "status.json").read_text())["status"] == "running"  # it could say nothing more
    resumed = run(config(tmp_path / "resumed", estimator, f"resume={killed}"))
    if expected_checkpoint:
        assert Path(resumed["resumed_from"]).name == expected_checkpoint
    resumed_at = torch.load(resumed["resumed_from"], weights_only=True)["global_step"] if resumed_at is None else resumed_at
    assert torch.load(resumed["resumed_from"], weights_only=True)["global_step"] == resumed_at
    assert_continues(uninterrupted(estimator), tmp_path / "resumed", resumed_at)


def test_a_run_killed_twice_and_before_its_first_checkpoint_resumes_exactly(uninterrupted, tmp_path):
    """Killed at step 2 (no checkpoint yet: the resume starts it afresh), then inside epoch 0 and inside epoch 1: each
    resume continues the one before, the status of a killed run reads as interrupted, and the results name the chain."""
    from catvae.sweep import read_status, run_state

    kill = ["+callbacks.kill._target_=test_kill_resume.KillAt", "+callbacks.kill.hook=on_train_batch_start"]
    first, second, third, last = (tmp_path / name for name in ("first", "second", "third", "last"))
    run_until_killed(config(first, "reinforce", *kill, "+callbacks.kill.step=2"))
    assert run_state(read_status(first)) == "interrupted"
    run_until_killed(config(second, "reinforce", *kill, "+callbacks.kill.step=6", f"resume={first}"))
    assert "resumed_from" not in read_status(second) and read_status(second)["chain"] == []  # started afresh
    run_until_killed(config(third, "reinforce", *kill, "+callbacks.kill.step=14", f"resume={second}"))
    assert read_status(third)["chain"] == [str(second)]
    results = run(config(last, "reinforce", f"resume={third}"))
    assert Path(results["resumed_from"]).name == "step000012.ckpt"
    assert results["chain"] == [str(second), str(third)]
    assert read_status(last)["status"] == "finished" and read_status(last)["chain"] == results["chain"]
    assert_continues(uninterrupted("reinforce"), last, 12)


def test_a_run_resumed_at_an_epoch_end_then_killed_at_the_next_resumes_exactly(tmp_path):
    """Killed after epoch 0's end checkpoints, resumed, killed after epoch 1's (step000016, written by the resumed run),
    resumed again: the second resume starts epoch 2, as the uninterrupted run does, instead of training epoch 1 again
    (Lightning's restart at an epoch's last batch left that run's epoch counters one short)."""
    by_epochs = ["trainer.max_steps=-1"]  # 3 whole epochs, 24 steps: the campaign's runs count epochs, not steps
    kill = ["+callbacks.kill._target_=test_kill_resume.KillAt", "+callbacks.kill.hook=on_train_epoch_start"]
    full, first, second, last = (tmp_path / name for name in ("full", "first", "second", "last"))
    run(config(full, "rloo", *by_epochs))
    run_until_killed(config(first, "rloo", *by_epochs, *kill, "+callbacks.kill.step=8"))
    run_until_killed(config(second, "rloo", *by_epochs, *kill, "+callbacks.kill.step=16", f"resume={first}"))
    results = run(config(last, "rloo", *by_epochs, f"resume={second}"))
    assert Path(results["resumed_from"]).name == "step000016.ckpt"
    expected = json.loads((full / "results.json").read_text())
    assert results["global_step"] == expected["global_step"] == 24 and results["metrics"] == expected["metrics"]
    assert_same(checkpoint_state(full / "checkpoints" / "step000024.ckpt"),
                checkpoint_state(last / "checkpoints" / "step000024.ckpt"))
    full_rows, resumed_rows = logged(full), logged(last)
    assert resumed_rows == full_rows[len(full_rows) - len(resumed_rows):] and resumed_rows[0]["step"] == "16"


def test_a_killed_multirun_job_reruns_with_resume(uninterrupted, tmp_path):
    """A 2-job multirun killed in its second job (the first finished); re-run with resume=<old sweep>/<job number>: the
    finished job is only tested again, the killed one continues; both end as uninterrupted runs end. compare.py reports
    the killed job as interrupted."""
    jobs = [*FAST, *KILLABLE, "estimator=gumbel_softmax,reinforce"]
    killed = train_cli("-m", *jobs, f"hydra.sweep.dir={tmp_path}/sweep", "+callbacks.kill._target_=test_kill_resume.KillAt",
                       "+callbacks.kill.hook=on_train_batch_start", "+callbacks.kill.step=14",
                       "+callbacks.kill.estimator=reinforce", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    compared = script("compare.py", tmp_path / "sweep")
    with open(tmp_path / "sweep" / "comparison" / "runs.csv") as handle:
        assert {row["directory"].rsplit("/", 1)[-1]: row["status"] for row in csv.DictReader(handle)} == {
            "0": "finished", "1": "interrupted"}, compared.stderr
    rerun = train_cli("-m", *jobs, f"hydra.sweep.dir={tmp_path}/rerun", f"resume={tmp_path}/sweep/${{hydra:job.num}}",
                      cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for job, estimator, resumed_at in (("0", "gumbel_softmax", STEPS), ("1", "reinforce", 12)):
        results = json.loads((tmp_path / "rerun" / job / "results.json").read_text())
        assert results["chain"] == [str(tmp_path / "sweep" / job)]
        assert_continues(uninterrupted(estimator), tmp_path / "rerun" / job, resumed_at)


@pytest.mark.parametrize("changed", [["estimator=rloo"], ["model.n_vars=5"], ["model.optimizer.lr=0.02", "data.seed=3"],
                                     ["callbacks.nonfinite_guard.policy=skip"]])
def test_a_resume_that_changes_the_math_is_refused_naming_each_key(changed, uninterrupted, tmp_path):
    with pytest.raises(ValueError, match="the config differs from the checkpoint's") as refused:
        run(config(tmp_path / "resumed", "reinforce", *changed, f"resume={uninterrupted('reinforce')}"))
    for override in changed:
        key = "estimator.name" if override.startswith("estimator=") else override.split("=")[0]
        assert f"  {key}: " in str(refused.value)
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # refused before training


def test_a_resume_may_change_lengths_logging_and_observers(uninterrupted, tmp_path):
    """max_steps raised, logger and log interval changed, the picture callback dropped: accepted, and the run goes on
    from its last step."""
    results = run(config(tmp_path / "longer", "reinforce", "trainer.max_steps=24", "logger=none",
                         "trainer.log_every_n_steps=5", "callbacks.image_grids=null",
                         f"resume={uninterrupted('reinforce')}"))
    assert results["global_step"] == 24 and Path(results["resumed_from"]).name == f"step{STEPS:06d}.ckpt"
