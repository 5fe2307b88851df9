"""What a user sees after `wandb sync`, read back from the offline run files with `wandb leet inspect` (no server, no
network): project, group = experiment, job type = estimator, tags, name, the config keys the README names, the summary
and history metrics, the image media; for a single run, each job of a multirun, and a resumed run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catvae.run import run
from conftest import FAST, compose_config
from test_training import train_cli

WANDB = [o for o in FAST if not o.startswith("logger")] + ["logger=wandb"]
NOT_THERE = ("`wandb leet inspect` (wandb's reader of offline runs, pinned as wandb==0.31.0 in requirements.txt) is "
             "missing or changed its output")


def wandb_cli() -> str:
    """The wandb command installed with the Python that runs the tests (its environment need not be on PATH), else
    the one on PATH."""
    beside = Path(sys.executable).parent / "wandb"
    return str(beside) if beside.is_file() else shutil.which("wandb") or "wandb"


def inspect(run_dir: Path, summary: bool) -> dict | list[dict]:
    """`wandb leet inspect [--summary] --json` of the run directory's one offline W&B run."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    command = [wandb_cli(), "leet", "inspect", *(["--summary"] if summary else []), "--json",
               str(offline)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.fail(NOT_THERE)
    assert done.returncode == 0, f"{NOT_THERE}: {done.stderr[-2000:]}"
    try:
        return json.loads(done.stdout) if summary else [json.loads(line) for line in done.stdout.splitlines()]
    except json.JSONDecodeError:
        pytest.fail(f"{NOT_THERE}: {done.stdout[:500]}")


def run_record(records: list[dict]) -> dict:
    (record,) = [r["run"] for r in records if r["type"] == "run"]
    return record


def history_keys(records: list[dict]) -> set[str]:
    return {key.split(".")[0] for r in records if r["type"] == "history" for key in r["history"]["item"]}


def assert_what_a_user_sees(run_dir: Path, estimator: str, tau: float, experiment: str = "default") -> None:
    summary, records = inspect(run_dir, summary=True), inspect(run_dir, summary=False)
    assert summary["state"] == "finished" and summary["project"] == "catvae"
    assert summary["name"] == f"{estimator}-tau{tau}-seed0"
    assert summary["tags"] == [estimator, "constant"]
    config = summary["config"]
    assert config["estimator"]["name"] == estimator and config["estimator"]["tau"] == tau and config["seed"] == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert summary["summary"]["test/nll_iw"] == pytest.approx(results["metrics"]["test/nll_iw"], rel=1e-6)
    assert "val/nelbo" in summary["summary"]
    record = run_record(records)
    assert record["run_group"] == experiment and record["job_type"] == estimator
    assert {"train/loss", "val/nelbo", "test/nll_iw", "tau", "val/reconstructions", "val/prior_samples",
            "val/code_usage"} <= history_keys(records)
    for media in ("val/reconstructions", "val/prior_samples"):
        assert summary["summary"][media]["_type"] == "images/separated"


def test_a_single_run_reads_back_as_documented(tmp_path):
    run(compose_config(WANDB + ["estimator=gumbel_softmax", "estimator.tau=0.5"], tmp_path / "run"))
    assert_what_a_user_sees(tmp_path / "run", "gumbel_softmax", 0.5)


def test_each_job_of_a_multirun_reads_back_as_its_own_run(tmp_path):
    done = train_cli("-m", *WANDB, "estimator=gumbel_softmax", "estimator.tau=0.5,2.0", "experiment_name=sweep_check",
                     f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for job, tau in (("0", 0.5), ("1", 2.0)):
        assert_what_a_user_sees(tmp_path / "sweep" / job, "gumbel_softmax", tau, experiment="sweep_check")


def test_a_resumed_run_is_a_new_wandb_run_whose_history_starts_at_its_resume_point(tmp_path):
    """As the README says: a resumed run writes a W&B run of its own (its own id, in its output directory), with the
    same name, group and tags; its training history starts where it resumed."""
    overrides = WANDB + ["estimator=gumbel_softmax", "callbacks.step_checkpoint.every_n_train_steps=4"]
    run(compose_config(overrides + ["trainer.max_epochs=1"], tmp_path / "first"))
    run(compose_config(overrides + [f"resume={tmp_path / 'first'}"], tmp_path / "resumed"))
    first, resumed = (inspect(tmp_path / d, summary=True) for d in ("first", "resumed"))
    assert first["run_id"] != resumed["run_id"] and first["name"] == resumed["name"]
    assert resumed["state"] == "finished" and resumed["summary"]["trainer/global_step"] == 16
    steps = [r["history"]["item"]["trainer/global_step"] for r in inspect(tmp_path / "resumed", summary=False)
             if r["type"] == "history" and "train/loss" in r["history"]["item"]]
    assert min(steps) >= 8
