"""Shared fixtures: Hydra composition of the real configs, and exact expectations by enumeration."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
# Every estimator the configs offer (conf/estimator/*.yaml), for tests run over all of them.
ESTIMATORS = sorted(path.stem for path in (CONF_DIR / "estimator").glob("*.yaml"))

# Tests never touch the network: W&B writes offline files at most.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A fast config: synthetic 8x8 data, a small VAE, two short epochs, cheap test bound, CPU.
FAST = [
    "data=synthetic",
    "model.n_vars=4",
    "model.n_classes=4",
    "model.hidden_sizes=[32]",
    "model.optimizer.lr=1e-2",
    "model.iw_samples=20",
    "model.iw_chunk_size=8",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
]


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose conf/config.yaml as train.py would, with ``paths.output_dir`` set (no Hydra runtime)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir) if output_dir is not None else "unused"
    return cfg


@pytest.fixture
def fast_config(tmp_path):
    """compose(extra overrides) -> the FAST config writing under tmp_path."""
    def make(*overrides: str) -> DictConfig:
        return compose_config(FAST + list(overrides), tmp_path / "run")
    return make


def all_one_hot(n_vars: int, n_classes: int) -> torch.Tensor:
    """Every configuration of N categorical variables with K classes, one-hot: (K^N, N, K)."""
    configs = torch.tensor(list(itertools.product(range(n_classes), repeat=n_vars)))  # (K^N, N)
    return torch.nn.functional.one_hot(configs, n_classes).float()


def exact_expectation(logits: torch.Tensor, objective) -> torch.Tensor:
    """E_{q(z)}[f(z)] per example by enumerating all K^N configurations; differentiable.

    logits (B, N, K); objective(z (C, B, N, K)) -> (C, B). Returns (B,).
    """
    _, n_vars, n_classes = logits.shape
    z = all_one_hot(n_vars, n_classes)[:, None].expand(-1, logits.shape[0], -1, -1)  # (C, B, N, K)
    log_q = (z * torch.log_softmax(logits, -1)).sum((-1, -2))  # (C, B)
    return (log_q.exp() * objective(z)).sum(0)
