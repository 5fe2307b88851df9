"""Gradient diagnostics: variance, signal-to-noise ratio, and bias of gradient estimators against a reference.

At fixed parameters and a fixed batch x, an estimator yields random gradient estimates g_1..g_M of
d/d phi E_q[f] (phi: the encoder's parameters, or the logits). With g_bar their mean and g_ref a reference
gradient (exact by enumeration, or the mean of R independent many-sample RLOO estimates):

    var     = tr Cov[g]           = sum_i Var[g_i], the total variance of one estimate
    snr     = ||g_bar|| / sqrt(var)
    cos     = (1/M) sum_m cos(g_m, g_ref), how well one estimate points where the reference does
    bias    = ||g_bar - g_ref||
    bias_se = sqrt(var / M + var_ref / R), the size ``bias`` has when the estimator is unbiased
              (the noise of g_bar and of g_ref; var_ref = 0 for the exact reference)
    var_x_evals = var x the objective evaluations per example of one estimate (Estimator.evaluations): the
              variance at equal work (averaging m estimates divides var by m and multiplies the work by m)

so ``bias`` well above ``bias_se`` measures a real bias. Each draw is a forward and backward pass on the
fixed batch; the draws use their own random stream (seeded by the step), so turning the diagnostics on does
not change the training run's samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from catvae.estimators import RLOO, Estimator, Exact
from catvae.validation import check_integer

@dataclass
class Reference:
    """A reference gradient: the mean (D,) and the variance of that mean, tr Cov[g_ref] (0 if exact)."""

    mean: Tensor
    variance_of_mean: float


def gradient_draws(model, x: Tensor, estimator: Estimator, n_draws: int) -> tuple[Tensor, Tensor]:
    """n_draws independent estimates of the gradient of the batch's mean negative ELBO, as
    (encoder-parameter gradients (M, D), logit gradients (M, B*N*K)), each flattened and multiplied back by the
    estimator's ``encoder_scale``. ``model`` provides ``nelbo_estimate(x, estimator)``, ``surrogate_loss(estimate,
    kl)`` and ``encoder_parameters()``."""
    params = list(model.encoder_parameters())
    param_draws, logit_draws = [], []
    for _ in range(n_draws):
        estimate, kl, logits = model.nelbo_estimate(x, estimator)
        grads = torch.autograd.grad(model.surrogate_loss(estimate, kl), [logits, *params], allow_unused=True)
        scale = float(estimate.encoder_scale)  # undo variance normalisation: compare the estimates themselves
        logit_draws.append(grads[0].flatten() * scale)
        param_draws.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                      for g, p in zip(grads[1:], params)]) * scale)
    return torch.stack(param_draws).double(), torch.stack(logit_draws).double()


def reference_of(draws: Tensor) -> Reference:
    """The reference made of M draws: their mean, and (for M >= 2) its variance tr Cov / M."""
    variance = draws.var(0).sum().item() / len(draws) if len(draws) > 1 else 0.0
    return Reference(draws.mean(0), variance)


def gradient_statistics(draws: Tensor, reference: Reference) -> dict[str, float]:
    """The statistics of the module docstring for M >= 2 draws (M, D) against a reference."""
    if len(draws) < 2:
        raise ValueError(f"gradient statistics need at least 2 draws, got {len(draws)}")
    mean, variance = draws.mean(0), draws.var(0).sum().item()
    cosines = F.cosine_similarity(draws, reference.mean.expand_as(draws), dim=1)
    return {
        "var": variance,
        "snr": mean.norm().item() / math.sqrt(variance) if variance > 0 else math.inf,
        "cos": cosines.mean().item(),
        "bias": (mean - reference.mean).norm().item(),
        "bias_se": math.sqrt(variance / len(draws) + reference.variance_of_mean),
    }


class GradientDiagnostics(pl.Callback):
    """Every ``every_n_steps`` training steps (from step 0), on a fixed batch of ``batch_size`` validation
    images and at the current parameters: ``n_draws`` gradient estimates from the run's estimator and from
    each estimator of ``panel`` (name -> Estimator; use stateless ones: a panel estimator's running
    baseline or learned control variate would never be trained), compared with a
    reference gradient. Logged per estimator as ``grad/<name>/<stat>`` (encoder parameters) and
    ``grad/<name>/logits_<stat>`` (the logits), stat in var, snr, cos, bias, bias_se; and the reference's own
    noise as ``grad/reference/var``.

    The reference is ``exact`` (enumeration) when K^N <= ``max_exact_configurations``, otherwise the mean of
    ``reference_draws`` RLOO estimates with ``reference_samples`` samples each. With ``follow_tau`` the panel's
    relaxed estimators use the run's current temperature. The run's estimator is evaluated in eval mode so its
    running statistics do not move. Cost per diagnostic, in forward/backward passes on ``batch_size`` images:
    n_draws x (1 + panel size), plus one pass over all K^N configurations for the exact reference or
    reference_draws x reference_samples decoder passes for RLOO.
    """

    affects_training = False  # its draws use their own stream: a resume may add, drop or change it

    def __init__(self, every_n_steps: int = 1000, n_draws: int = 16, batch_size: int = 100,
                 panel: dict[str, Estimator] | None = None, reference_samples: int = 100, reference_draws: int = 4,
                 max_exact_configurations: int = 1024, follow_tau: bool = True, seed: int = 0):
        for key, value, minimum in (("every_n_steps", every_n_steps, 1), ("n_draws", n_draws, 2),
                                    ("batch_size", batch_size, 1), ("reference_samples", reference_samples, 2),
                                    ("reference_draws", reference_draws, 2),
                                    ("max_exact_configurations", max_exact_configurations, 1)):
            check_integer(f"callbacks.grad_diagnostics.{key}", value, minimum)
        self.every_n_steps, self.n_draws, self.batch_size = every_n_steps, n_draws, batch_size
        self.step_period = every_n_steps  # measures at the start of these steps (catvae.step_calls)
        self.panel = dict(panel or {})
        self.reference_samples, self.reference_draws = reference_samples, reference_draws
        self.max_exact_configurations, self.follow_tau, self.seed = max_exact_configurations, follow_tau, seed
        self.batch: Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        context_dim = pl_module.estimator_context_dim
        for estimator in self.panel.values():
            estimator.bind(pl_module.n_vars, pl_module.n_classes, context_dim)

    def held_out_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        if self.batch is None:
            images = next(iter(trainer.datamodule.val_dataloader()))[0][: self.batch_size]
            self.batch = pl_module.flatten((images, None))
        return self.batch.to(pl_module.device)

    def reference(self, pl_module: pl.LightningModule, x: Tensor) -> tuple[Reference, Reference]:
        """(encoder-parameter reference, logit reference)."""
        if pl_module.n_classes ** pl_module.n_vars <= self.max_exact_configurations:
            params, logits = gradient_draws(pl_module, x, Exact(self.max_exact_configurations), 1)
        else:
            params, logits = gradient_draws(pl_module, x, RLOO(self.reference_samples), self.reference_draws)
        return reference_of(params), reference_of(logits)

    def measure(self, pl_module: pl.LightningModule, x: Tensor) -> dict[str, float]:
        """All logged values at the current parameters."""
        estimators = {pl_module.estimator.name: pl_module.estimator}
        estimators.update({e.name: e for e in self.panel.values() if e.name not in estimators})
        tau = getattr(pl_module.estimator, "tau", None)
        param_ref, logit_ref = self.reference(pl_module, x)
        metrics = {"grad/reference/var": param_ref.variance_of_mean * self.reference_draws}  # of one draw
        for name, estimator in estimators.items():
            if self.follow_tau and tau is not None and hasattr(estimator, "tau"):
                estimator.tau = tau
            params, logits = gradient_draws(pl_module, x, estimator, self.n_draws)
            for stat, value in gradient_statistics(params, param_ref).items():
                metrics[f"grad/{name}/{stat}"] = value
            # the equal-work comparison: the variance of an average of estimates that cost as much as one evaluation
            metrics[f"grad/{name}/var_x_evals"] = metrics[f"grad/{name}/var"] * estimator.evaluations()
            for stat, value in gradient_statistics(logits, logit_ref).items():
                metrics[f"grad/{name}/logits_{stat}"] = value
        return metrics

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        x = self.held_out_batch(trainer, pl_module)
        was_training = pl_module.estimator.training
        pl_module.estimator.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed * 1_000_003 + step)
                metrics = self.measure(pl_module, x)
        finally:
            pl_module.estimator.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
