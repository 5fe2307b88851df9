"""Gradient estimators for categorical latent variables; all follow :class:`Estimator`'s contract."""

from catvae.estimators.base import Estimate, Estimator, Objective, TemperatureEstimator
from catvae.estimators.baselines import Baseline, LearnedBaseline, MovingAverageBaseline, NoBaseline
from catvae.estimators.coupled import ARM, CARMS, DisARM
from catvae.estimators.control_variates import RELAX, REBAR
from catvae.estimators.exact import Exact
from catvae.estimators.multi_sample import VIMCO
from catvae.estimators.relaxed import (ZGR, DecoupledSTGumbelSoftmax, GappedStraightThrough, GumbelRao, GumbelSoftmax,
                                       ReinMax, STGumbelSoftmax, StraightThrough)
from catvae.estimators.score_function import DARN, RLOO, DoubleControlVariate, IndeCateR, MuProp, Reinforce

__all__ = [
    "ARM", "CARMS", "DARN", "REBAR", "RELAX", "VIMCO", "Baseline", "DecoupledSTGumbelSoftmax", "DisARM",
    "DoubleControlVariate", "Estimate", "Estimator", "Exact", "GappedStraightThrough", "GumbelRao", "GumbelSoftmax",
    "IndeCateR", "LearnedBaseline", "MovingAverageBaseline", "MuProp", "NoBaseline", "Objective", "RLOO",
    "Reinforce", "ReinMax", "STGumbelSoftmax", "StraightThrough", "TemperatureEstimator", "ZGR",
]
