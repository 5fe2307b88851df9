"""Gradient estimators for categorical latent variables; all follow :class:`Estimator`'s contract."""

from catvae.estimators.base import Estimate, Estimator, Objective
from catvae.estimators.baselines import Baseline, MovingAverageBaseline, NoBaseline
from catvae.estimators.relaxed import GumbelSoftmax, STGumbelSoftmax
from catvae.estimators.score_function import Reinforce

__all__ = [
    "Baseline", "Estimate", "Estimator", "GumbelSoftmax", "MovingAverageBaseline", "NoBaseline",
    "Objective", "Reinforce", "STGumbelSoftmax",
]
