"""The semi-supervised M2 model (Kingma et al. 2014) of Jang et al. (2017, Section 4.3) as a LightningModule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from catvae.estimators import Estimate, Estimator
from catvae.models.networks import bernoulli_nll
from catvae.models.stepped import SteppedModule
from catvae.models.optim import OptimizerFactory, estimator_parameter_groups
from catvae.models.vae import CategoricalVAE
from catvae.relaxations import categorical_log_prob, kl_to_uniform
from catvae.step_logging import written_this_step
from catvae.validation import check_integer, check_sizes

Batch = tuple[Tensor, Tensor, Tensor]


def halved_sizes(size: int, n_layers: int) -> list[int]:
    """Spatial sizes through ``n_layers`` 3x3 convolutions of stride 2 and padding 1: [s, ceil(s/2), ...]."""
    sizes = [size]
    for _ in range(n_layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def conv_features(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """3x3 convolutions of stride 2 with ReLU, then flatten: (B, C, H, W) -> (B, c_L * h_L * w_L)."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip([in_channels, *channels[:-1]], channels):
        layers += [nn.Conv2d(n_in, n_out, 3, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten())


class ConvDecoder(nn.Module):
    """p(x|y,z): a linear map of [y, z] to a (c_L, h_L, w_L) feature map, then L transposed 3x3 convolutions of
    stride 2 that retrace the encoder's sizes back to (H, W) (channels c_L -> ... -> c_1 -> c_1) and a transposed
    3x3 convolution of stride 1 to the image channels, ReLU between: (..., B, K + Z) -> Bernoulli logits (..., B, D)."""

    def __init__(self, input_dim: int, image_shape: Sequence[int], channels: Sequence[int]):
        super().__init__()
        image_channels, height, width = image_shape
        heights, widths = halved_sizes(height, len(channels)), halved_sizes(width, len(channels))
        self.map_shape = (channels[-1], heights[-1], widths[-1])
        self.to_map = nn.Sequential(nn.Linear(input_dim, math.prod(self.map_shape)), nn.ReLU())
        layers: list[nn.Module] = []
        path = [*reversed(channels), channels[0]]  # c_L, ..., c_1, c_1
        for i, (n_in, n_out) in enumerate(zip(path[:-1], path[1:])):
            small, large = len(channels) - i, len(channels) - i - 1  # indices into the sizes
            # a stride-2 transposed conv gives 2n - 1 + output_padding pixels: output_padding picks the target size
            padding = (heights[large] - 2 * heights[small] + 1, widths[large] - 2 * widths[small] + 1)
            layers += [nn.ConvTranspose2d(n_in, n_out, 3, stride=2, padding=1, output_padding=padding), nn.ReLU()]
        layers.append(nn.ConvTranspose2d(channels[0], image_channels, 3, stride=1, padding=1))
        self.deconvs = nn.Sequential(*layers)

    def forward(self, inputs: Tensor) -> Tensor:
        leading = inputs.shape[:-1]  # (..., B)
        maps = self.to_map(inputs.reshape(-1, inputs.shape[-1])).view(-1, *self.map_shape)  # (M, c_L, h_L, w_L)
        return self.deconvs(maps).view(*leading, -1)  # (..., B, D)


class SemiSupervisedM2(SteppedModule):
    """M2: p(x, y, z) = p(x|y,z) p(y) p(z) with y ~ Uniform(K), z ~ N(0, I_Z), p(x|y,z) Bernoulli;
    q(y|x) = Cat(softmax(classifier(x))), q(z|x,y) = N(mean(x, y), diag exp(log_var(x, y))).

    Networks (``channels`` = (c_1, ..., c_L), L = 3 by default): q(y|x) is L convolutions (3x3, stride 2, ReLU) and
    a linear map to K logits; q(z|x,y) has its own L convolutions of x, whose features h(x) are concatenated with y
    and mapped linearly to (mean, log_var), computed as W_h h(x) + W_y y so that h(x) is shared by every y; p(x|y,z)
    is :class:`ConvDecoder` (a linear map and L + 1 transposed convolutions).

    Per example, with one reparameterised z ~ q(z|x,y) and KL_z(x, y) = KL(q(z|x,y) || N(0, I)) in closed form:

        labelled     L(x, y) = -log p(x|y,z) + KL_z(x, y) - log p(y)                (-ELBO of log p(x, y))
        unlabelled   U(x)    = E_{q(y|x)}[ -log p(x|y,z) + KL_z(x, y) ] + KL(q(y|x) || Uniform(K))
                             = E_{q(y|x)}[ L(x, y) + log q(y|x) ]                   (-ELBO of log p(x))

    The held estimator handles y in U: q(y|x)'s logits are (B, N=1, K) and its objective f(y) for y (..., B, 1, K)
    is -log p(x|y,z) + KL_z(x, y) (one z per y drawn inside); KL(q(y|x) || Uniform) is analytic and added as in
    :meth:`CategoricalVAE.surrogate_loss`. ``exact`` marginalises y (the paper's "marginalization"). Estimators
    without analytic KL get f(y) = L(x, y) + log q(y|x), the whole sampled bound.

    Training objective: Kingma et al.'s (2014, Eq. 9) J^alpha, their alpha = 0.1 N written alpha N (Jang et al. select
    alpha from {0.1, 0.2, 0.3, 0.8, 1.0}), over N unlabelled training images U and N_l labelled pairs L:

        J^alpha = sum_U U(x) + sum_L L(x, y) + alpha N E_L[ -log q(y|x) ]
                = sum_U U(x) + sum_L [ L(x, y) + beta (-log q(y|x)) ],   beta = alpha N / N_l

    (beta is the per-example weight in Kingma et al.'s code). Each batch holds B unlabelled images and B_l labelled
    pairs (the small labelled set is cycled), and each sum becomes the mean over its own batch:

        loss = mean_B U(x) + mean_{B_l} [ L(x, y) + alpha * alpha_scale * (-log q(y|x)) ],   alpha_scale = N / N_l,

    an unbiased estimate of (1/N) sum_U U + (1/N_l) sum_L [L + beta (-log q)]: every example keeps its weight in
    J^alpha relative to the others of its set, and the two sets weigh the same in total (the labelled pairs, seen
    N / N_l times more often than unlabelled images when B_l = B, weigh N / N_l times more than in J^alpha).
    alpha_scale = 500 for 100 labels among 50,000 images. ``train/loss`` logs the loss's value.
    Evaluation: ``val/nelbo`` and ``test/nelbo`` are U(x) with the expectation over y exact (one z per class),
    ``val/accuracy`` and ``test/accuracy`` that of argmax q(y|x).
    """

    def __init__(self, estimator: Estimator, optimizer: OptimizerFactory, image_shape: Sequence[int],
                 n_classes: int = 10, z_dim: int = 50, channels: Sequence[int] = (8, 16, 32), alpha: float = 0.1,
                 alpha_scale: float = 500.0):
        super().__init__()
        check_integer("model.n_classes", n_classes, minimum=2)
        check_integer("model.z_dim", z_dim)
        channels, image_shape = check_sizes("model.channels", channels), [int(s) for s in image_shape]  # plain lists
        if not channels:
            raise ValueError("model.channels must list at least one convolution's channels, got []")
        if len(image_shape) != 3:
            raise ValueError(f"model.image_shape must be (C, H, W), got {image_shape!r}")
        for key, value in (("model.alpha", alpha), ("model.alpha_scale", alpha_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        self.save_hyperparameters(ignore=["estimator", "optimizer"])
        self.estimator = estimator
        self.optimizer_factory = optimizer
        self.image_shape = tuple(image_shape)
        self.n_classes, self.z_dim = n_classes, z_dim
        self.alpha, self.alpha_scale = float(alpha), float(alpha_scale)
        height, width = (halved_sizes(size, len(channels))[-1] for size in image_shape[1:])
        feature_dim = channels[-1] * height * width  # F, the flattened conv features
        self.classifier_body = conv_features(image_shape[0], channels)
        self.to_logits = nn.Linear(feature_dim, n_classes)
        self.z_body = conv_features(image_shape[0], channels)
        self.z_from_x = nn.Linear(feature_dim, 2 * z_dim)
        self.z_from_y = nn.Linear(n_classes, 2 * z_dim, bias=False)
        self.decoder = ConvDecoder(n_classes + z_dim, image_shape, channels)
        self.estimator_context_dim = feature_dim
        estimator.bind(1, n_classes, context_dim=feature_dim)

    # ----- the model -----
    def classify(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """q(y|x): images (B, C, H, W) -> (logits (B, K), features (B, F)); features are the estimator's context."""
        features = self.classifier_body(images)  # (B, F)
        return self.to_logits(features), features

    def reparameterize(self, mean: Tensor, log_var: Tensor) -> Tensor:
        """z = mean + exp(log_var / 2) * eps, eps ~ N(0, I): (..., B, Z)."""
        return mean + (0.5 * log_var).exp() * torch.randn_like(mean)

    def nelbo_given_y(self, x: Tensor, z_features: Tensor, y: Tensor) -> Tensor:
        """-log p(x|y,z) + KL(q(z|x,y) || N(0, I)) with one z ~ q(z|x,y), the -ELBO of log p(x|y).

        x (B, D) binary, z_features h(x) (B, F), y (..., B, K) one-hot or relaxed -> (..., B).
        """
        stats = self.z_from_x(z_features) + self.z_from_y(y)  # (..., B, 2Z)
        mean, log_var = stats.chunk(2, dim=-1)  # (..., B, Z) each
        z = self.reparameterize(mean, log_var)
        x_logits = self.decoder(torch.cat([y, z], dim=-1))  # (..., B, D)
        recon = bernoulli_nll(x_logits, x)
        kl_z = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum(-1)  # (..., B)
        return recon + kl_z

    def log_prior(self) -> float:
        """log p(y) = -log K for every y under the uniform prior."""
        return -math.log(self.n_classes)

    def labelled_loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(L(x, y) (B_l,), -log q(y|x) (B_l,)) for images (B_l, C, H, W) with labels (B_l,)."""
        logits = self.classify(images)[0]  # (B_l, K)
        y = F.one_hot(labels, self.n_classes).to(logits.dtype)  # (B_l, K)
        nelbo = self.nelbo_given_y(images.flatten(1), self.z_body(images), y) - self.log_prior()
        return nelbo, F.cross_entropy(logits, labels, reduction="none")

    def unlabelled_estimate(self, images: Tensor,
                            estimator: Estimator | None = None) -> tuple[Estimate, Tensor, Tensor]:
        """One estimate of U(x) for images (B, C, H, W) by ``estimator`` (default: the held one).

        Returns (estimate, kl (B,), logits (B, 1, K)): U(x) ~ estimate.loss + kl, and the gradient of
        :meth:`CategoricalVAE.surrogate_loss` (estimate, kl) is the estimator's. kl = KL(q(y|x) || Uniform(K)) with an
        analytic-KL estimator; otherwise f(y) is the whole sampled bound L(x, y) + log q(y|x) and kl = 0.
        """
        estimator = self.estimator if estimator is None else estimator
        logits, context = self.classify(images)
        logits = logits.unsqueeze(1)  # (B, 1, K)
        x, z_features = images.flatten(1), self.z_body(images)  # (B, D), (B, F)

        def nelbo(y: Tensor) -> Tensor:  # y (..., B, 1, K) -> (..., B)
            return self.nelbo_given_y(x, z_features, y[..., 0, :])

        if estimator.analytic_kl:
            objective, kl = nelbo, kl_to_uniform(logits)  # kl (B,)
        else:
            objective = lambda y: nelbo(y) - self.log_prior() + categorical_log_prob(logits, y)  # noqa: E731
            kl = torch.zeros_like(logits[:, 0, 0])
        return estimator(logits, objective, context=context), kl, logits

    def loss_and_metrics(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(the loss of the class docstring, as a surrogate whose gradient is the training gradient,
        {metric: detached value})."""
        unlabelled, labelled, labels = batch
        estimate, kl, _ = self.unlabelled_estimate(unlabelled)
        labelled_nelbo, cross_entropy = self.labelled_loss(labelled, labels)
        supervised = (labelled_nelbo + self.alpha * self.alpha_scale * cross_entropy).mean()
        unlabelled_nelbo = (estimate.loss + kl).mean()
        metrics = {"train/loss": unlabelled_nelbo + supervised, "train/unlabelled_nelbo": unlabelled_nelbo,
                   "train/labelled_nelbo": labelled_nelbo.mean(), "train/cross_entropy": cross_entropy.mean()}
        return CategoricalVAE.surrogate_loss(estimate, kl) + supervised, {k: v.detach() for k, v in metrics.items()}

    @torch.no_grad()
    def marginal_nelbo(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(U(x) (B,) with the expectation over y exact, one z per class; logits (B, K)), one class at a time."""
        logits = self.classify(images)[0]  # (B, K)
        q = logits.softmax(-1)
        x, z_features = images.flatten(1), self.z_body(images)
        one_hot = torch.eye(self.n_classes, device=logits.device, dtype=logits.dtype)  # (K, K)
        expected = sum(q[:, k] * self.nelbo_given_y(x, z_features, one_hot[k].expand_as(q))
                       for k in range(self.n_classes))  # (B,)
        return expected + kl_to_uniform(logits.unsqueeze(1)), logits

    # ----- Lightning hooks -----
    def setup(self, stage: str) -> None:
        """Refuse a datamodule whose labels have another number of classes than the model."""
        n_classes = getattr(self.trainer.datamodule, "n_classes", None)
        if n_classes is not None and n_classes != self.n_classes:
            raise ValueError(f"model.n_classes={self.n_classes} differs from the data's {n_classes} classes "
                             f"(set model.n_classes, or data.label_classes for random labels)")

    def training_loss(self, batch: Batch) -> Tensor:
        loss, metrics = self.loss_and_metrics(batch)
        if written_this_step(self.trainer):
            self.log_dict(metrics, on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        images, labels = batch
        nelbo, logits = self.marginal_nelbo(images)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        self.log_dict({f"{prefix}/nelbo": nelbo.mean(), f"{prefix}/accuracy": accuracy}, on_epoch=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The configured optimiser over the model's parameters, the estimator's own (baselines, control variates)
        in a second group with the estimator's ``optim`` options."""
        return self.optimizer_factory(
            estimator_parameter_groups(self, self.estimator.parameters(), self.estimator.optim))
