"""One training run from a composed Hydra config: instantiate, fit, test, write results.

``train.py`` is a thin Hydra entry point around :func:`run`; tests call :func:`run` directly with
configs composed by Hydra's compose API.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

from catvae.progress import drop_library_notices, line_progress_if_not_a_terminal
from catvae.resume import ResumePoint, check_resume_config, resolve_resume, resume_chain
from catvae.step_calls import StepGrouping, check_trainer, step_periods
from catvae.sweep import read_status, write_status
from catvae.validation import check_choice, check_integer

log = logging.getLogger(__name__)

TEST_CHECKPOINTS = ("best", "last", None)


def configure_wandb_environment() -> None:
    """W&B stays offline unless the user chose otherwise through WANDB_MODE (online/disabled).

    Set through the environment rather than ``WandbLogger(offline=True)``, which would overwrite
    WANDB_MODE for the whole process and leak into later jobs of a multirun.
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


def use_cached_cuda_check() -> None:
    """Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 when imported, so that looking for a GPU does not initialise
    CUDA before a fork. Under it every torch.cuda.is_available(), which Adam and AdamW (not SGD) call at each step,
    loads NVML again: 0.1 ms per step on a CPU-only machine. A run forks no process after that point (sweep jobs start in
    fresh processes), so the check goes back to torch's cached CUDA device count."""
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


def check_run_config(cfg: DictConfig) -> None:
    """Checks of top-level keys; each group's own values are checked by the class it instantiates."""
    check_integer("seed", cfg.seed, minimum=0)
    check_choice("test_ckpt", cfg.test_ckpt, TEST_CHECKPOINTS)
    check_integer("steps_per_call", cfg.get("steps_per_call", 1))
    check_choice("flush_denormal", cfg.get("flush_denormal", False), (False, True))
    resume = cfg.get("resume")
    if resume is not None and (not isinstance(resume, str) or not resume):
        raise ValueError(f"resume must be a checkpoint path or a run directory, got {resume!r}")


def set_flush_denormal(flush: bool) -> None:
    """Denormal floats (|x| < 1.2e-38) read and written as 0 on the CPU, or not; threads started later inherit it.
    Flushing changes nothing a run measures but skips the CPU's slow path for such values, which a trained SBN's
    saturated units produce (docs/performance.md)."""
    if not torch.set_flush_denormal(flush) and flush:
        log.warning("flush_denormal=true: this CPU cannot flush denormals; they are kept")


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-shaped config group (callbacks, loggers); None -> []."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None]


def instantiate_loggers(group: DictConfig | None) -> list[Logger]:
    """The configured loggers, minus any that cannot start: a W&B run that fails to initialise (unreachable,
    misconfigured) is dropped with one warning, and training goes on with the others (the CSV logger)."""
    loggers = []
    for name, node in (group or {}).items():
        if node is None:
            continue
        try:
            logger = instantiate(node)
            if isinstance(logger, WandbLogger):
                logger.experiment  # noqa: B018 - starts the W&B run now, so a failure surfaces here
        except Exception as error:  # noqa: BLE001 - logging must never cost the run
            log.warning("logger %s could not start (%s: %s); continuing without it", name, type(error).__name__,
                        error)
            print(f"[catvae] WARNING: logger {name} could not start ({type(error).__name__}: {error}); "
                  f"continuing without it")
            continue
        loggers.append(logger)
    return loggers


def job_overrides() -> list[str]:
    """The command-line overrides of this Hydra job ([] outside Hydra, e.g. in tests)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def tested_checkpoint(trainer: pl.Trainer, which: str | None) -> str | None:
    """The file behind test_ckpt="best"/"last" (the best is tracked by the first ModelCheckpoint)."""
    if which == "best":
        return trainer.checkpoint_callback.best_model_path
    if which == "last":
        paths = [c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path]
        return max(paths, key=lambda p: Path(p).stat().st_mtime) if paths else None
    return None


def finish_wandb(loggers: list[Logger]) -> None:
    """Close the W&B run of this job: in a multirun all jobs share one process, and a run left open
    would swallow the next job's metrics."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def run(cfg: DictConfig) -> dict:
    """Train and test one model; returns the test metrics (also written to results.json).

    The run's directory receives config.yaml (the resolved config) and status.json (running, then
    finished or failed with the error) before anything else can fail.
    """
    configure_wandb_environment()
    use_cached_cuda_check()
    drop_library_notices()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    overrides = job_overrides()
    write_status(output_dir, "running", overrides, chain=[])
    try:
        results = train_and_test(cfg, output_dir)
    except BaseException as error:
        write_status(output_dir, "failed", overrides, error, **resume_entries(output_dir))
        raise
    write_status(output_dir, "finished", overrides, **resume_entries(output_dir))
    return results


def resume_entries(output_dir: Path) -> dict:
    """The resume chain recorded in this run's status.json when it started, kept in its later statuses."""
    record = read_status(output_dir) or {}
    return {key: record[key] for key in ("resumed_from", "chain") if key in record}


def build_model(cfg: DictConfig, image_shape: list[int]) -> pl.LightningModule:
    """The configured model holding the configured estimator; its networks compiled when ``compile`` is set."""
    model = instantiate(cfg.model, estimator=instantiate(cfg.estimator), image_shape=image_shape)
    if cfg.get("compile"):
        log.info("compiled: %s", ", ".join(instantiate(cfg.compile)(model)))
    return model


def group_steps(trainer: pl.Trainer, model: pl.LightningModule, datamodule, steps_per_call: int) -> None:
    """steps_per_call > 1: the model trains on groups of batches, one optimiser step each (catvae.step_calls);
    refused, before training, where that could not be the same run as steps_per_call=1."""
    if steps_per_call == 1:
        return
    check_trainer(trainer, steps_per_call)
    # Lightning's note that a step checkpoint of manual optimisation holds the weights after the step: as at k = 1
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    grouping = StepGrouping(steps_per_call, step_periods(trainer), trainer.max_steps)
    n_batches = len(datamodule.train_batches())
    grouping.check(n_batches)
    # Lightning's warning that an epoch's calls are fewer than log_every_n_steps: the logging counts steps, not calls
    calls = len(grouping.calls(0, n_batches))
    warnings.filterwarnings("ignore", message=rf"The number of training batches \({calls}\) is smaller than the logging")
    datamodule.step_grouping = grouping
    model.run_steps_per_call(steps_per_call)


def train_and_test(cfg: DictConfig, output_dir: Path) -> dict:
    """Check, build, fit (or resume), test the chosen checkpoint, write results.json; returns the results."""
    check_run_config(cfg)
    started = time.time()
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    set_flush_denormal(cfg.get("flush_denormal", False))
    pl.seed_everything(cfg.seed, workers=True)

    # Everything that can reject bad input is built before the trainer starts.
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_from = resolve_resume(cfg.resume) if cfg.get("resume") else None
    chain = resume_chain(resume_from) if resume_from else []
    if resume_from:
        check_resume_config(torch.load(resume_from, map_location="cpu", weights_only=True), config, resume_from)
        write_status(output_dir, "running", job_overrides(), resumed_from=str(resume_from), chain=chain)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # reads the data and checks sizes against it
    model = build_model(cfg, list(datamodule.image_shape))
    estimator = model.estimator
    # ResumePoint first: it records where the run is after each step before any other callback can write a checkpoint
    callbacks = ([ResumePoint(cfg.seed, config)] + instantiate_group(cfg.callbacks) + [instantiate(cfg.schedule)]
                 + line_progress_if_not_a_terminal(cfg.trainer.get("enable_progress_bar", True)))
    for callback in callbacks:  # callbacks that constrain the model (the deferred non-finite guard) refuse it now
        if hasattr(callback, "check_model"):
            callback.check_model(model)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    group_steps(trainer, model, datamodule, cfg.get("steps_per_call", 1))
    loggers = instantiate_loggers(cfg.logger)  # last: they start their runs (a W&B run) now
    trainer.loggers = loggers
    try:
        for logger in loggers:
            logger.log_hyperparams(config)
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        which = cfg.test_ckpt if trainer.checkpoint_callback is not None else None
        if which == "best" and not trainer.checkpoint_callback.best_model_path:
            which = "last"
        # the file itself, not "best": Lightning warns on "best" when the run has several ModelCheckpoints
        ckpt_file = tested_checkpoint(trainer, which)
        (test_metrics,) = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_file, weights_only=True)
    finally:
        finish_wandb(loggers)

    results = {
        "experiment": cfg.experiment_name,
        "estimator": estimator.name,
        "seed": cfg.seed,
        "tau": getattr(estimator, "tau", None),  # the final temperature, for estimators that have one
        "evaluations_per_step": estimator.evaluations(),  # objective evaluations per example and step
        "metrics": {key: float(value) for key, value in test_metrics.items()},
        "tested_checkpoint": ckpt_file,
        "resumed_from": str(resume_from) if resume_from else None,
        "chain": chain,  # the run directories this one continues, oldest first
        "global_step": trainer.global_step,
        "wall_time_s": round(time.time() - started, 1),
        "output_dir": str(output_dir),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = ", ".join(f"{k}={v:.3f}" for k, v in sorted(results["metrics"].items()) if math.isfinite(v))
    log.info("test metrics: %s", summary)
    print(f"[catvae] {estimator.name} ({results['evaluations_per_step']} objective evaluations per example and step) "
          f"test metrics: {summary}")
    print(f"[catvae] outputs in {output_dir} (results.json, config.yaml, checkpoints/, csv/metrics.csv, images/)")
    return results
