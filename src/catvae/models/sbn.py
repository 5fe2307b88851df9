"""The structured-output-prediction sigmoid belief network of Jang et al. (2017, Section 4.1).

Predict the lower half of a binarized digit from its upper half through L stochastic layers,
392-200-200-392 (Bernoulli: N = 200, K = 2) or 392-(20x10)-(20x10)-392 (categorical).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from catvae.estimators import Estimate, Estimator
from catvae.evaluation import negative_log_mean_weight
from catvae.models.networks import bernoulli_nll, mlp
from catvae.models.stepped import SteppedModule
from catvae.models.optim import OptimizerFactory, estimator_parameter_groups
from catvae.relaxations import sample_categorical_by_inversion, sample_two_classes_by_inversion
from catvae.step_logging import written_this_step
from catvae.validation import check_integer, check_sizes


def value_with_gradient_of(estimate: Estimate) -> Tensor:
    """A tensor whose value is ``estimate.loss`` and whose gradient is that of ``estimate.surrogate``.

    This makes a whole estimate usable as the objective of the layer above: that layer's estimator
    reads f(z) (the sampled loss) as its learning signal and back-propagates the lower layers' gradient
    estimates through f.
    """
    return estimate.surrogate + (estimate.loss - estimate.surrogate).detach()


def fold_two_class_input(linear: nn.Linear) -> nn.Linear:
    """The layer on indicators b (..., N) that equals ``linear`` on one-hot pairs h_n = (1 - b_n, b_n)
    flattened to (..., 2N): W h + c = sum_n (W_:,2n+1 - W_:,2n) b_n + (c + sum_n W_:,2n)."""
    weight, bias = linear.weight, linear.bias
    folded = nn.utils.skip_init(nn.Linear, weight.shape[1] // 2, weight.shape[0])  # no draws from the seed
    folded.weight.data, folded.bias.data = weight[:, 1::2] - weight[:, 0::2], bias + weight[:, 0::2].sum(1)
    return folded


def fold_two_class_output(linear: nn.Linear) -> nn.Linear:
    """The layer that writes the logit differences d_n = l_n,1 - l_n,2 of ``linear``'s logits (..., 2N) read
    as (N, 2): rows 2n minus rows 2n+1 of W and c."""
    weight, bias = linear.weight, linear.bias
    folded = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0] // 2)
    folded.weight.data, folded.bias.data = weight[0::2] - weight[1::2], bias[0::2] - bias[1::2]
    return folded


def fold_two_class_net(net: nn.Sequential, fold_input: bool, fold_output: bool) -> nn.Sequential:
    """``net`` with its first Linear reading indicators and/or its last writing logit differences."""
    layers = list(net)
    if fold_input:
        layers[0] = fold_two_class_input(layers[0])
    if fold_output:
        layers[-1] = fold_two_class_output(layers[-1])
    return nn.Sequential(*layers)


class StructuredPredictionSBN(SteppedModule):
    """p(x_lower | x_upper) = sum_h p(x_lower | h_L) prod_l p(h_l | h_{l-1}),  h_0 = x_upper,

    with p(h_l | h_{l-1}) = prod_n Cat(h_ln; softmax(net_l(h_{l-1})_n)) for N variables of K classes
    (K = 2: a sigmoid belief network) and p(x_lower | h_L) = Bernoulli(sigmoid(out(h_L))). Every net is
    linear by default (``hidden_sizes`` adds deterministic ReLU layers inside each).

    Training minimises E_h[-log p(x_lower | h)] with one sample (Jang et al. 2017, 4.1); each stochastic
    layer holds its own copy of the configured estimator (its own baselines), and a layer's objective is
    the estimate of the layers below it (:func:`value_with_gradient_of`), so any estimator of the
    contract trains every layer. Evaluation: -log (1/m) sum_i p(x_lower | h_i), h_i ~ p(h | x_upper)
    one-hot, m = ``test_samples`` (``val_samples`` in validation): a stochastic upper bound on
    -log p(x_lower | x_upper) that tightens as m grows.

    Notes: MuProp, which evaluates its objective at the mean-field point too, runs the layers below there
    as well, with fresh noise and their baselines updated by that evaluation. The SBN has no closed-form
    term, so the estimators' ``encoder_scale`` is not needed.
    """

    def __init__(self, estimator: Estimator, optimizer: OptimizerFactory, image_shape: Sequence[int],
                 n_layers: int = 2, n_vars: int = 200, n_classes: int = 2, hidden_sizes: Sequence[int] = (),
                 val_samples: int = 100, test_samples: int = 1000, chunk_size: int = 100):
        super().__init__()
        for key, value, minimum in (("model.n_layers", n_layers, 1), ("model.n_vars", n_vars, 1),
                                    ("model.n_classes", n_classes, 2), ("model.val_samples", val_samples, 1),
                                    ("model.test_samples", test_samples, 1), ("model.chunk_size", chunk_size, 1)):
            check_integer(key, value, minimum)
        hidden_sizes, image_shape = check_sizes("model.hidden_sizes", hidden_sizes), [int(s) for s in image_shape]
        if image_shape[-2] < 2:
            raise ValueError(f"images need at least 2 rows to split into halves, got image_shape={image_shape}")
        self.save_hyperparameters(ignore=["estimator", "optimizer"])
        self.optimizer_factory = optimizer
        self.n_vars, self.n_classes = n_vars, n_classes
        self.val_samples, self.test_samples, self.chunk_size = val_samples, test_samples, chunk_size
        channels, height, width = image_shape[-3:]
        self.upper_dim = channels * (height // 2) * width  # the first height // 2 rows of every channel
        lower_dim = channels * height * width - self.upper_dim
        latent_dim = n_vars * n_classes
        self.layers = nn.ModuleList(
            mlp([self.upper_dim if i == 0 else latent_dim, *hidden_sizes, latent_dim]) for i in range(n_layers))
        self.output = mlp([latent_dim, *hidden_sizes, lower_dim])
        self.layer_estimators = nn.ModuleList([estimator, *(copy.deepcopy(estimator) for _ in range(n_layers - 1))])
        for i, layer_estimator in enumerate(self.layer_estimators):
            layer_estimator.bind(n_vars, n_classes, context_dim=self.upper_dim if i == 0 else latent_dim)

    @property
    def estimator(self) -> Estimator:
        """The first layer's estimator: its name and temperature stand for all layers (schedules set every
        layer's, see :class:`catvae.callbacks.TemperatureSchedule`)."""
        return self.layer_estimators[0]

    def halves(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> (x_upper (B, C*(H//2)*W), x_lower (B, rest)), rows split per channel."""
        height = images.shape[-2]
        return images[..., :height // 2, :].flatten(1), images[..., height // 2:, :].flatten(1)

    def layer_logits(self, layer: int, inputs: Tensor) -> Tensor:
        """inputs (M, D_in) -> logits of p(h_layer | inputs), (M, N, K)."""
        return self.layers[layer](inputs).view(-1, self.n_vars, self.n_classes)

    def lower_nll(self, h: Tensor, x_lower: Tensor) -> Tensor:
        """-log p(x_lower | h_L) for h (..., M, N, K), x_lower broadcastable to (..., M, D) -> (..., M)."""
        return bernoulli_nll(self.output(h.flatten(-2)), x_lower)  # (..., M)

    def estimate_from(self, layer: int, inputs: Tensor, x_lower: Tensor) -> Estimate:
        """The estimate of E[-log p(x_lower | h_L) | h_{layer-1} = inputs] by layers ``layer``..L.

        inputs (..., M, D_in) and x_lower (..., M, D) may carry the sample dimensions of the layers above
        (multi-sample estimators, enumeration); they are folded into the batch of this layer. Returns an
        Estimate with loss and surrogate of shape (..., M).
        """
        lead = inputs.shape[:-1]  # (..., M)
        flat_inputs = inputs.reshape(-1, inputs.shape[-1])  # (M', D_in)
        flat_target = x_lower.expand(*lead, x_lower.shape[-1]).reshape(-1, x_lower.shape[-1])  # (M', D)
        last = layer == len(self.layers) - 1

        def objective(h: Tensor) -> Tensor:  # h (..., M', N, K) -> (..., M')
            if last:
                return self.lower_nll(h, flat_target)
            return value_with_gradient_of(self.estimate_from(layer + 1, h.flatten(-2), flat_target))

        estimate = self.layer_estimators[layer](self.layer_logits(layer, flat_inputs), objective, context=flat_inputs)
        return Estimate(loss=estimate.loss.view(lead), surrogate=estimate.surrogate.view(lead), z=estimate.z)

    @torch.no_grad()
    def prediction_nll(self, images: Tensor, n_samples: int) -> Tensor:
        """-log (1/m) sum_i p(x_lower | h_i), h_i ~ p(h | x_upper) one-hot, per example (B,).

        The weights are p(x_lower | h_L) of ancestral draws (the importance-weighted bound with the prior
        p(h_1 | x_upper) as its own proposal, whose log-probabilities cancel), drawn by
        :meth:`two_class_log_weights` for K = 2 and :meth:`one_hot_log_weights` otherwise.
        """
        x_upper, x_lower = self.halves(images)
        draw = self.two_class_log_weights if self.n_classes == 2 else self.one_hot_log_weights
        return negative_log_mean_weight(draw(x_upper, x_lower), n_samples, self.chunk_size)

    def one_hot_log_weights(self, x_upper: Tensor, x_lower: Tensor) -> Callable[[int], Tensor]:
        """size -> log p(x_lower | h_L) (size, B) for ``size`` ancestral one-hot draws h ~ p(h | x_upper)."""
        logits = self.layer_logits(0, x_upper)  # (B, N, K)

        def draw(size: int) -> Tensor:
            h = sample_categorical_by_inversion(logits, (size,))  # (size, B, N, K)
            for layer in range(1, len(self.layers)):
                logits_below = self.layer_logits(layer, h.flatten(-2).flatten(0, -2)).view(h.shape)
                h = sample_categorical_by_inversion(logits_below)
            return -self.lower_nll(h, x_lower)

        return draw

    def two_class_log_weights(self, x_upper: Tensor, x_lower: Tensor) -> Callable[[int], Tensor]:
        """:meth:`one_hot_log_weights` for K = 2 on indicators b (size, B, N) of the second class.

        Each net is folded (:func:`fold_two_class_net`) to read b instead of the one-hot pairs and to write
        the logit differences d = l_1 - l_2 instead of both logits, which halves the output layer's matrix
        product and quarters the middle layers'. The uniforms are drawn in the one-hot path's order, so
        both paths make the same draws up to the rounding of d (tests/test_sbn.py).
        """
        nets = [fold_two_class_net(net, fold_input=i > 0, fold_output=True) for i, net in enumerate(self.layers)]
        output = fold_two_class_net(self.output, fold_input=True, fold_output=False)
        first = nets[0](x_upper)  # (B, N)

        def draw(size: int) -> Tensor:
            b = sample_two_classes_by_inversion(first, (size,))  # (size, B, N)
            for net in nets[1:]:
                b = sample_two_classes_by_inversion(net(b))
            return -bernoulli_nll(output(b), x_lower)

        return draw

    # ----- Lightning hooks -----
    def training_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x_upper, x_lower = self.halves(batch[0])
        estimate = self.estimate_from(0, x_upper, x_lower)
        if written_this_step(self.trainer):
            self.log("train/loss", estimate.loss.detach().mean(), on_step=True, on_epoch=False)
        return estimate.surrogate.mean()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/nll", self.prediction_nll(batch[0], self.val_samples).mean(), on_epoch=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test/nll", self.prediction_nll(batch[0], self.test_samples).mean(), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The configured optimiser; every layer's estimator parameters in a group with the estimator's ``optim``."""
        return self.optimizer_factory(
            estimator_parameter_groups(self, self.layer_estimators.parameters(), self.estimator.optim))
