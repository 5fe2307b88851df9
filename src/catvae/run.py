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
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)

TEST_CHECKPOINTS = ("best", "last", None)


def configure_wandb_environment() -> None:
    """W&B stays offline unless the user chose otherwise through WANDB_MODE (online/disabled).

    Set through the environment rather than ``WandbLogger(offline=True)``, which would overwrite
    WANDB_MODE for the whole process and leak into later jobs of a multirun.
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


def check_run_config(cfg: DictConfig) -> None:
    """Checks of top-level keys; each group's own values are checked by the class it instantiates."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    if cfg.test_ckpt not in TEST_CHECKPOINTS:
        raise ValueError(f"test_ckpt={cfg.test_ckpt!r} is not allowed; choose one of {list(TEST_CHECKPOINTS)}")


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-shaped config group (callbacks, loggers); None -> []."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None]


def finish_wandb(loggers: list[Logger]) -> None:
    """Close the W&B run of this job: in a multirun all jobs share one process, and a run left open
    would swallow the next job's metrics."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def run(cfg: DictConfig) -> dict:
    """Train and test one model; returns the test metrics (also written to results.json)."""
    configure_wandb_environment()
    check_run_config(cfg)
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    # Everything that can reject bad input is built before the trainer starts.
    datamodule = instantiate(cfg.data)
    estimator = instantiate(cfg.estimator)
    model = instantiate(cfg.model, estimator=estimator, image_shape=list(datamodule.image_shape))
    callbacks = instantiate_group(cfg.callbacks) + [instantiate(cfg.schedule)]
    loggers = instantiate_group(cfg.logger)
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        trainer.fit(model, datamodule=datamodule)
        ckpt_path = cfg.test_ckpt if trainer.checkpoint_callback is not None else None
        if ckpt_path == "best" and not trainer.checkpoint_callback.best_model_path:
            ckpt_path = "last" if trainer.checkpoint_callback.last_model_path else None
        (test_metrics,) = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_wandb(loggers)

    results = {
        "experiment": cfg.experiment_name,
        "estimator": estimator.name,
        "seed": cfg.seed,
        "tau": getattr(estimator, "tau", None),  # the final temperature, for estimators that have one
        "metrics": {key: float(value) for key, value in test_metrics.items()},
        "tested_checkpoint": ckpt_path and str(getattr(trainer.checkpoint_callback, f"{ckpt_path}_model_path")),
        "global_step": trainer.global_step,
        "wall_time_s": round(time.time() - started, 1),
        "output_dir": str(output_dir),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = ", ".join(f"{k}={v:.3f}" for k, v in sorted(results["metrics"].items()) if math.isfinite(v))
    log.info("test metrics: %s", summary)
    print(f"[catvae] {estimator.name} test metrics: {summary}")
    print(f"[catvae] outputs in {output_dir} (results.json, checkpoints/, csv/metrics.csv, images/, wandb/)")
    return results
