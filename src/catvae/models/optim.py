"""Optimiser parameter groups shared by the models."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def estimator_parameter_groups(model: nn.Module, estimator_parameters: Iterable[nn.Parameter],
                               estimator_options: dict | None = None) -> list[dict]:
    """Two parameter groups: the model's own parameters (the configured optimiser's options), then the
    estimators' parameters (learned baselines, control variates, temperatures) with ``estimator_options``
    (an estimator's ``optim``, e.g. its own learning rate). The second group is left out when empty."""
    estimator_parameters = list(estimator_parameters)
    estimator_ids = {id(p) for p in estimator_parameters}
    groups = [{"params": [p for p in model.parameters() if id(p) not in estimator_ids]}]
    if estimator_parameters:
        groups.append({"params": estimator_parameters, **(estimator_options or {})})
    return groups
