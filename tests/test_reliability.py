"""Reliability: exact mid-epoch resume, corrupt checkpoints, the non-finite guard, sweeps that survive a failed
job, and training that survives a logger that cannot start."""

import json
import math
import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from catvae.models import CategoricalVAE
from catvae.resume import resolve_resume
from catvae.run import run
from conftest import FAST, compose_config
from test_compare import script
from test_training import column, read_metrics, train_cli

RESUMABLE = ["callbacks.step_checkpoint.every_n_train_steps=4", "trainer.max_epochs=3"]


class Preempted(RuntimeError):
    pass


class CrashAt(pl.Callback):
    """Simulates a preemption: the process dies before training step ``step`` (after its checkpoint)."""

    affects_training = False

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Preempted(f"simulated preemption at step {self.step}")


class PoisonedVAE(CategoricalVAE):
    """A VAE whose training loss is NaN at one step (for the non-finite guard)."""

    def __init__(self, poison_step: int, **kwargs):
        # plain containers, so that the hyperparameters Lightning saves load with weights_only
        kwargs = {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in kwargs.items()}
        super().__init__(**kwargs)
        self.poison_step = poison_step

    def training_loss(self, batch):
        loss = super().training_loss(batch)
        return loss * math.nan if self.global_step == self.poison_step else loss


def config(path, *overrides):
    return compose_config(FAST + RESUMABLE + list(overrides), path)


def final_state(run_dir):
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint["state_dict"], checkpoint["global_step"]


@pytest.mark.parametrize("estimator", ["gumbel_softmax", "reinforce", "rebar"])
def test_resume_after_a_mid_epoch_preemption_equals_the_uninterrupted_run(estimator, tmp_path):
    """Stopped before step 12 (epochs of 8 steps: mid-epoch), resumed from the run directory: same weights, same
    estimator state (baseline, learned control variate), same test metrics, bit for bit."""
    full = run(config(tmp_path / "full", f"estimator={estimator}"))
    with pytest.raises(Preempted):
        run(config(tmp_path / "stopped", f"estimator={estimator}", "+callbacks.crash._target_=test_reliability.CrashAt",
                   "+callbacks.crash.step=12"))
    assert json.loads((tmp_path / "stopped" / "status.json").read_text())["status"] == "failed"
    resumed = run(config(tmp_path / "resumed", f"estimator={estimator}", f"resume={tmp_path / 'stopped'}"))
    assert resumed["resumed_from"].endswith("step000012.ckpt")
    (full_state, full_steps), (resumed_state, resumed_steps) = final_state(tmp_path / "full"), final_state(
        tmp_path / "resumed")
    assert full_steps == resumed_steps == 24
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        assert torch.equal(full_state[key], resumed_state[key]), key
    assert resumed["metrics"] == full["metrics"]
    # the resumed run logged only the steps it trained
    assert min(int(row["step"]) for row in read_metrics(tmp_path / "resumed") if row.get("train/loss")) >= 12


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    run(config(tmp_path / "run", "estimator=gumbel_softmax"))
    checkpoints = tmp_path / "run" / "checkpoints"
    newest = max(checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    newest.write_bytes(newest.read_bytes()[:1000])  # a write cut short
    chosen = resolve_resume(str(tmp_path / "run"))
    assert chosen != newest and chosen.parent == checkpoints
    assert "is corrupt" in caplog.text
    with pytest.raises(ValueError, match="the checkpoint is corrupt or not a catvae checkpoint"):
        resolve_resume(str(newest))
    for path in checkpoints.glob("*.ckpt"):
        path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable checkpoint in .*tried: "):
        resolve_resume(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="neither a checkpoint file nor a run directory"):
        resolve_resume(str(tmp_path / "nowhere"))


def poisoned(path, policy, check_every_n_steps=1):
    return compose_config(FAST + ["model._target_=test_reliability.PoisonedVAE", "+model.poison_step=5",
                                  f"callbacks.nonfinite_guard.policy={policy}",
                                  f"callbacks.nonfinite_guard.check_every_n_steps={check_every_n_steps}"], path)


# 1: the host reads the verdict at every step; 4: sync-free steps, read at steps 4, 8, ... (the bad step is 5)
CHECKS = pytest.mark.parametrize("check_every_n_steps", [1, 4])


@CHECKS
def test_nonfinite_loss_raises_naming_the_step(tmp_path, check_every_n_steps):
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 5 with estimator st_gumbel_softmax"):
        run(poisoned(tmp_path / "run", "raise", check_every_n_steps))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "at step 5" in status["error"]


@CHECKS
def test_nonfinite_loss_is_skipped_and_counted(tmp_path, check_every_n_steps):
    results = run(poisoned(tmp_path / "run", "skip", check_every_n_steps))
    assert results["global_step"] == 16 and all(map(math.isfinite, results["metrics"].values()))
    skipped = column(read_metrics(tmp_path / "run"), "train/skipped_steps")
    assert skipped[0] == 0 and skipped[-1] == 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(value).all() for value in state.values())


def test_a_failed_job_does_not_stop_the_sweep_and_is_summarised(tmp_path):
    overrides = [o for o in FAST if not o.startswith("trainer.max_epochs")]
    done = train_cli("-m", *overrides, "trainer.max_epochs=1", "estimator=gumbel_softmax",
                     "estimator.tau=0.5,1.0,-1.0,2.0", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert done.returncode != 0
    assert "1 of 4 jobs failed" in done.stderr and "estimator.tau=-1.0" in done.stderr
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert summary["finished"] == ["0", "1", "3"] and list(summary["failed"]) == ["2"]
    assert "estimator.tau must be a positive finite number" in summary["failed"]["2"]["error"]
    for job in ("0", "1", "3"):
        assert (tmp_path / "sweep" / job / "results.json").is_file()
    compared = script("compare.py", tmp_path / "sweep")
    assert compared.returncode == 0 and "1 of 4 runs unfinished or failed" in compared.stderr
    listed = (tmp_path / "sweep" / "comparison" / "summary.md").read_text()
    assert f"`{tmp_path / 'sweep' / '2'}`: failed;" in listed and "got -1.0" in listed


def test_training_survives_a_wandb_run_that_cannot_start(tmp_path, capsys):
    cfg = compose_config([o for o in FAST if not o.startswith("logger")] + ["logger=wandb", "+logger.wandb.id=bad/id"],
                         tmp_path / "run")
    results = run(cfg)
    assert "logger wandb could not start" in capsys.readouterr().out
    assert results["global_step"] == 16
    for name in ("config.yaml", "results.json", "status.json", "csv/metrics.csv", "checkpoints/last.ckpt"):
        assert (tmp_path / "run" / name).is_file(), name


def test_a_finished_run_directory_holds_everything(tmp_path):
    run(compose_config(FAST, tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"
    assert "n_vars: 4" in (tmp_path / "run" / "config.yaml").read_text()  # resolved config


class SignalAt(pl.Callback):
    """Simulates a SLURM preemption notice: SIGUSR1 to this process at the end of training step ``step``, after the
    other callbacks have acted (Lightning's handler, deferred to the end of the next step, saves hpc_ckpt_<n>.ckpt and
    calls `scontrol requeue`), then the job is killed at the end of that next step."""

    affects_training = False

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)
        if trainer.global_step == self.step + 1:
            raise Preempted(f"killed after the requeue signal at step {self.step}")


def test_slurm_preemption_requeue_and_resume_through_submitit(tmp_path):
    """Through hydra-submitit-launcher's local executor, in a fake SLURM environment (SLURM_* variables and an
    `scontrol` that records its call): the requeue signal at step 12 saves an HPC checkpoint at the end of step 13 and
    requeues the job; the requeued job (same command, same job directory) resumes from it and ends where an
    uninterrupted run ends."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "catvae", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    job = [*FAST, *RESUMABLE, "estimator=reinforce", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}/sweep",
           "hydra.launcher.timeout_min=10"]
    first = train_cli("-m", *job, "+callbacks.preempt._target_=test_reliability.SignalAt", "+callbacks.preempt.step=12",
                      cwd=tmp_path, env=slurm)
    assert first.returncode != 0  # the job was killed: the sweep reports it
    job_dir = tmp_path / "sweep" / "0"
    assert (job_dir / "hpc_ckpt_1.ckpt").is_file()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    requeued = train_cli("-m", *job, cwd=tmp_path, env=slurm)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    resumed = json.loads((job_dir / "results.json").read_text())
    uninterrupted = run(compose_config(FAST + RESUMABLE + ["estimator=reinforce"], tmp_path / "uninterrupted"))
    assert resumed["global_step"] == 24 and resumed["metrics"] == uninterrupted["metrics"]
    # it resumed (a fresh start would end in the same place): the requeued job trained steps 13..23 only
    assert min(int(row["step"]) for row in read_metrics(job_dir) if row.get("train/loss")) == 13
    for key, value in final_state(tmp_path / "uninterrupted")[0].items():
        assert torch.equal(value, final_state(job_dir)[0][key]), key


def test_the_slurm_launcher_config_composes(tmp_path):
    done = train_cli("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", "--package",
                     "hydra.launcher", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SlurmLauncher" in done.stdout and "partition: gpu" in done.stdout and "USR1@120" in done.stdout


@pytest.mark.parametrize("estimator", ["gumbel_softmax", "reinforce", "rebar"])
def test_bf16_autocast_trains_to_the_float32_result(estimator, tmp_path):
    """trainer.precision=bf16-mixed (CPU autocast here; bf16-mixed or 16-mixed on a GPU): the estimators keep
    their sampling and probability math in float32, so short runs end within a fraction of a nat of float32."""
    full = run(compose_config(FAST + [f"estimator={estimator}"], tmp_path / "fp32"))
    mixed = run(compose_config(FAST + [f"estimator={estimator}", "trainer.precision=bf16-mixed"], tmp_path / "bf16"))
    for key, value in full["metrics"].items():
        assert math.isfinite(mixed["metrics"][key]) and abs(mixed["metrics"][key] - value) < 1.0, key


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A crash in the middle of writing a checkpoint leaves the previous file intact (Lightning writes through
    an fsspec transaction: a temporary file, moved into place only once complete)."""
    from fsspec.implementations.local import LocalFileOpener
    from lightning_fabric.utilities.cloud_io import _atomic_save

    path = tmp_path / "last.ckpt"
    _atomic_save({"version": 1, "weights": torch.ones(1000)}, path)

    def crash(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(LocalFileOpener, "write", crash, raising=False)
    with pytest.raises(OSError, match="simulated"):
        _atomic_save({"version": 2, "weights": torch.zeros(1000)}, path)
    assert torch.load(path, weights_only=True)["version"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_status_writes_are_atomic(tmp_path, monkeypatch):
    """A crash in the middle of writing status.json leaves the previous status whole: a campaign polling the run,
    or a resume after the kill, never reads half a file."""
    from pathlib import Path

    from catvae.sweep import read_status, write_status

    write_status(tmp_path, "running", ["seed=0"])
    write_text = Path.write_text

    def crash(self, data, *args, **kwargs):
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(OSError, match="simulated"):
        write_status(tmp_path, "finished", ["seed=0"])
    monkeypatch.undo()
    assert read_status(tmp_path)["status"] == "running"
    write_status(tmp_path, "finished", ["seed=0"])
    assert read_status(tmp_path)["status"] == "finished"


@pytest.mark.parametrize("bad", [[math.inf], [math.nan], [math.inf, -math.inf]], ids=["inf", "nan", "inf-inf"])
def test_the_guard_names_a_non_finite_gradient(bad):
    """Any inf or NaN entry, including +inf and -inf in one tensor (whose sum is NaN, not inf), is caught."""
    from types import SimpleNamespace

    from catvae.callbacks import NonFiniteGuard

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    module.estimator = SimpleNamespace(name="rloo")
    module(torch.ones(1, 3)).sum().backward()
    module[1].weight.grad[0, : len(bad)] = torch.tensor(bad)
    guard, trainer = NonFiniteGuard("raise"), SimpleNamespace(global_step=7)
    guard.on_fit_start(trainer, module)
    guard.on_before_backward(trainer, module, torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match=r"non-finite gradient of 1.weight at step 7 with estimator rloo"):
        guard.on_before_optimizer_step(trainer, module, None)
    skipping = NonFiniteGuard("skip")
    skipping.on_fit_start(trainer, module)
    skipping.on_before_backward(trainer, module, torch.tensor(1.0))
    skipping.on_before_optimizer_step(trainer, module, None)
    assert skipping.skipped == 1 and all(p.grad is None for p in module.parameters())


def test_the_guard_treats_a_float32_overflow_of_finite_gradients_as_non_finite():
    """Finite gradients whose total exceeds float32's range cannot be told from an inf by their sums: the guard
    says so instead of naming a tensor."""
    from types import SimpleNamespace

    from catvae.callbacks import NonFiniteGuard

    module = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    module.estimator = SimpleNamespace(name="reinforce")
    for layer in module:
        layer.weight.grad = torch.full((1, 1), 3e38)
    guard, trainer = NonFiniteGuard("raise"), SimpleNamespace(global_step=3)
    guard.on_fit_start(trainer, module)
    guard.on_before_backward(trainer, module, torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match=r"non-finite gradient sum \(finite terms whose total overflows"):
        guard.on_before_optimizer_step(trainer, module, None)
