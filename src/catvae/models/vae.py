"""The categorical VAE of Jang et al. (2017, Section 4.2) as a LightningModule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from catvae.estimators import Estimate, Estimator
from catvae.evaluation import importance_weighted_nll
from catvae.models.networks import bernoulli_nll, mlp
from catvae.models.stepped import SteppedModule
from catvae.models.optim import OptimizerFactory, estimator_parameter_groups
from catvae.relaxations import categorical_log_prob, kl_to_uniform, sample_categorical
from catvae.step_logging import written_this_step
from catvae.validation import check_integer, check_sizes


class CategoricalVAE(SteppedModule):
    """VAE with N categorical latents of K classes and a Bernoulli likelihood.

    q(z|x) = prod_n Cat(z_n; softmax(enc(x)_n)),  p(z) = prod_n Uniform(K),  p(x|z) = Bernoulli(sigmoid(dec(z))).
    Encoder D-h_1-...-h_L-(N*K) and mirrored decoder (N*K)-h_L-...-h_1-D, ReLU between layers.

    Training minimises the negative ELBO  E_q[-log p(x|z)] + KL(q(z|x) || p(z)): the KL is analytic,
    and the gradient of the expectation comes from the held :class:`Estimator`, whichever it is.
    Validation and test use hard one-hot samples only.
    """

    def __init__(self, estimator: Estimator, optimizer: OptimizerFactory, image_shape: Sequence[int],
                 n_vars: int = 20, n_classes: int = 10, hidden_sizes: Sequence[int] = (512, 256),
                 iw_samples: int = 1000, iw_chunk_size: int = 100):
        super().__init__()
        for key, value, minimum in (("model.n_vars", n_vars, 1), ("model.n_classes", n_classes, 2),
                                    ("model.iw_samples", iw_samples, 1), ("model.iw_chunk_size", iw_chunk_size, 1)):
            check_integer(key, value, minimum)
        hidden_sizes = check_sizes("model.hidden_sizes", hidden_sizes)  # plain lists: checkpointable
        image_shape = [int(s) for s in image_shape]
        self.save_hyperparameters(ignore=["estimator", "optimizer"])
        self.estimator = estimator
        self.optimizer_factory = optimizer
        self.image_shape = tuple(image_shape)
        self.n_vars, self.n_classes = n_vars, n_classes
        self.iw_samples, self.iw_chunk_size = iw_samples, iw_chunk_size
        input_dim, latent_dim = math.prod(self.image_shape), n_vars * n_classes
        self.encoder_body = mlp([input_dim, *hidden_sizes], final_activation=True)
        self.to_logits = torch.nn.Linear(hidden_sizes[-1] if hidden_sizes else input_dim, latent_dim)
        self.decoder = mlp([latent_dim, *reversed(hidden_sizes), input_dim])
        self.estimator_context_dim = hidden_sizes[-1] if hidden_sizes else input_dim
        estimator.bind(n_vars, n_classes, context_dim=self.estimator_context_dim)

    # ----- the model -----
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, D) -> (logits (B, N, K), features (B, H)); features are the estimator's context."""
        features = self.encoder_body(x)  # (B, H)
        logits = self.to_logits(features).view(-1, self.n_vars, self.n_classes)  # (B, N, K)
        return logits, features

    def encoder_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of q(z|x), whose gradients the estimators estimate."""
        return [*self.encoder_body.parameters(), *self.to_logits.parameters()]

    def decode(self, z: Tensor) -> Tensor:
        """z (..., B, N, K) -> Bernoulli logits of x (..., B, D)."""
        return self.decoder(z.flatten(-2))

    def reconstruction_nll(self, x: Tensor, z: Tensor) -> Tensor:
        """-log p(x|z) = sum_d BCE(dec(z)_d, x_d) for x (B, D), z (..., B, N, K) -> (..., B)."""
        return bernoulli_nll(self.decode(z), x)  # (..., B)

    def log_prior(self) -> float:
        """log p(z) = -N log K for every one-hot z under the uniform prior."""
        return -self.n_vars * math.log(self.n_classes)

    @staticmethod
    def flatten(batch: tuple[Tensor, Tensor]) -> Tensor:
        return batch[0].flatten(1)  # (B, D)

    # ----- Lightning hooks -----
    def nelbo_estimate(self, x: Tensor, estimator: Estimator | None = None) -> tuple[Estimate, Tensor, Tensor]:
        """One estimate of the negative ELBO of x (B, D) by ``estimator`` (default: the held one).

        Returns (estimate, kl (B,), logits (B, N, K)); the gradient of :meth:`surrogate_loss` is the training
        gradient. With an analytic-KL estimator f(z) = -log p(x|z) and the KL is closed-form;
        otherwise f(z) = -log p(x|z) - log p(z) + log q(z|x), the whole sampled bound, and kl = 0.
        """
        estimator = self.estimator if estimator is None else estimator
        logits, features = self.encode(x)
        if estimator.analytic_kl:
            objective, kl = (lambda z: self.reconstruction_nll(x, z)), kl_to_uniform(logits)  # kl (B,)
        else:
            objective = lambda z: self.reconstruction_nll(x, z) - self.log_prior() + categorical_log_prob(logits, z)  # noqa: E731
            kl = torch.zeros_like(logits[:, 0, 0])
        return estimator(logits, objective, context=features), kl, logits

    @staticmethod
    def surrogate_loss(estimate: Estimate, kl: Tensor) -> Tensor:
        """mean(surrogate + KL / s): the analytic KL's gradient (encoder only) is divided by the estimator's
        ``encoder_scale`` s, like its estimate of the rest, so variance normalisation never turns the gradient."""
        return (estimate.surrogate + kl / estimate.encoder_scale).mean()

    def training_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        estimate, kl, _ = self.nelbo_estimate(self.flatten(batch))
        if written_this_step(self.trainer):
            self.log("train/loss", (estimate.loss.detach() + kl.detach()).mean(), on_step=True, on_epoch=False)
        return self.surrogate_loss(estimate, kl)

    def _hard_sample_nelbo(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """One-sample negative ELBO with a hard one-hot z ~ q(z|x): (recon (B,), kl (B,))."""
        return self.reconstruction_nll(x, sample_categorical(logits)), kl_to_uniform(logits)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = self.flatten(batch)
        recon, kl = self._hard_sample_nelbo(x, self.encode(x)[0])
        self.log_dict({"val/nelbo": (recon + kl).mean(), "val/recon": recon.mean(), "val/kl": kl.mean()},
                      on_epoch=True, prog_bar=False)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = self.flatten(batch)
        logits = self.encode(x)[0]
        recon, kl = self._hard_sample_nelbo(x, logits)
        nll_iw = importance_weighted_nll(
            logits, lambda z: self.log_prior() - self.reconstruction_nll(x, z), self.iw_samples, self.iw_chunk_size)
        self.log_dict({"test/nelbo": (recon + kl).mean(), "test/recon": recon.mean(), "test/kl": kl.mean(),
                       "test/nll_iw": nll_iw.mean()}, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The configured optimiser over the model's parameters, with the estimator's own parameters
        (learned baselines, control variates) in a second group with the estimator's ``optim`` options."""
        return self.optimizer_factory(
            estimator_parameter_groups(self, self.estimator.parameters(), self.estimator.optim))

    # ----- pictures -----
    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Mean images E[x | z] for one hard z ~ q(z|x): (B, C, H, W) -> (B, C, H, W) in [0, 1]."""
        x = images.flatten(1)
        return torch.sigmoid(self.decode(sample_categorical(self.encode(x)[0]))).view(images.shape)

    @torch.no_grad()
    def sample_prior(self, n: int) -> Tensor:
        """Mean images E[x | z] for n draws z ~ p(z) (uniform): (n, C, H, W) in [0, 1]."""
        logits = torch.zeros(n, self.n_vars, self.n_classes, device=self.device)
        return torch.sigmoid(self.decode(sample_categorical(logits))).view(n, *self.image_shape)
