"""Gradient estimators for categorical latent variables; all follow :class:`Estimator`'s contract."""

from catvae.estimators.base import Estimate, Estimator, Objective, TemperatureEstimator
from catvae.estimators.baselines import Baseline, LearnedBaseline, MovingAverageBaseline, NoBaseline
from catvae.estimators.binary import ARM, DisARM
from catvae.estimators.control_variates import RELAX, REBAR
from catvae.estimators.exact import Exact
from catvae.estimators.multi_sample import VIMCO
from catvae.estimators.relaxed import (ZGR, GappedStraightThrough, GumbelRao, GumbelSoftmax, ReinMax, STGumbelSoftmax,
                                       StraightThrough)
from catvae.estimators.score_function import DARN, RLOO, IndeCateR, MuProp, Reinforce

__all__ = [
    "ARM", "DARN", "REBAR", "RELAX", "VIMCO", "Baseline", "DisARM", "Estimate", "Estimator", "Exact",
    "GappedStraightThrough", "GumbelRao", "GumbelSoftmax", "IndeCateR", "LearnedBaseline",
    "MovingAverageBaseline", "MuProp", "NoBaseline", "Objective", "RLOO", "Reinforce", "ReinMax", "STGumbelSoftmax",
    "StraightThrough", "TemperatureEstimator", "ZGR",
]
